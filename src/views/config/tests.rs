use super::*;

/// The example of the module doc of `crate::views`, kept in step with it by this test.
const EXAMPLE: &str = r#"
[topics."game.scores"]
format = "events"
name = "scores"
key = ["player"]

[views.high_scores]
from = "scores"
max_by = { key = ["player"], by = "score" }

[views.leaderboard]
from = "high_scores"
top_n = { order_by = ["score desc", "player"], limit = 5 }

[views.odds_history]
from = "game_odds"
history = { limit = 50, columns = ["odd1", "updated_at"] }

[views.odds_moves]
from = "game_odds"
delta = { columns = ["odd1"] }

[views.biggest_movers]
from = "odds_moves"
top_n = { order_by = ["odd1_move desc", "game_id"], limit = 5 }

[topics.transfers]
format = "events"

[views.balances]
from = "transfers"
[views.balances.group_by]
by = ["account"]
aggregates = { balance = "sum(amount)", transfers = "count()", largest = "max(amount)", mean = "avg(amount)", last = "latest(amount)" }
"#;

fn problem(text: &str) -> (usize, ViewProblem) {
    match ViewsFile::parse(text) {
        Err(ViewsError::Invalid { line, problem }) => (line, problem),
        other => panic!("expected a problem, got {other:?}"),
    }
}

#[test]
fn the_documented_example_loads() {
    let file = ViewsFile::parse(EXAMPLE).unwrap();
    assert_eq!(file.topics.len(), 2);
    let scores = file.topics.iter().find(|t| t.name == "scores").unwrap();
    assert_eq!(scores.topic, "game.scores");
    assert_eq!(scores.format, TopicFormat::Events);
    assert_eq!(scores.key.as_deref(), Some(&["player".to_string()][..]));
    let names: Vec<&str> = file.views.iter().map(|v| v.name.as_str()).collect();
    // inputs before the views that read them
    let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
    assert!(pos("high_scores") < pos("leaderboard"));
    assert!(pos("odds_moves") < pos("biggest_movers"));
    let hs = &file.views[pos("high_scores")];
    assert_eq!(hs.input, InputKind::Events);
    assert_eq!(
        hs.operator,
        OperatorDef::Extreme(ExtremeSpec {
            max: true,
            key: Some(vec!["player".into()]),
            by: "score".into()
        })
    );
    let lb = &file.views[pos("leaderboard")];
    assert_eq!(lb.input, InputKind::Table);
    assert_eq!(
        lb.operator,
        OperatorDef::TopN(TopNSpec {
            order_by: vec![
                SortColumn {
                    column: "score".into(),
                    descending: true
                },
                SortColumn {
                    column: "player".into(),
                    descending: false
                }
            ],
            limit: 5,
            group_by: vec![],
            rank: Some("rank".into())
        })
    );
    let balances = &file.views[pos("balances")];
    match &balances.operator {
        OperatorDef::GroupBy(g) => {
            assert_eq!(g.by, ["account"]);
            let kinds: Vec<(&str, AggKind, Option<&str>)> = g
                .aggregates
                .iter()
                .map(|a| (a.name.as_str(), a.kind, a.column.as_deref()))
                .collect();
            assert!(kinds.contains(&("balance", AggKind::Sum, Some("amount"))));
            assert!(kinds.contains(&("transfers", AggKind::Count, None)));
            assert!(kinds.contains(&("mean", AggKind::Avg, Some("amount"))));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(file.views[pos("odds_history")].line, 16);
}

#[test]
fn the_module_doc_example_is_this_one() {
    // the doc comment of crate::views carries the same file; compare them token by token
    let doc = include_str!("../mod.rs");
    let start = doc.find("//! ```toml").unwrap();
    let end = start + doc[start..].find("//! ```\n").unwrap();
    let doc_toml: String = doc[start..end]
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix("//!").unwrap_or(l).trim())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(" #").next().unwrap_or(l).trim())
        .collect::<Vec<_>>()
        .join(" ");
    let ours: String = EXAMPLE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ");
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(squash(&doc_toml), squash(&ours));
}

#[test]
fn problems_name_their_line() {
    let (line, p) = problem("[views.a]\nfrom = \"t\"\n");
    assert_eq!((line, p), (2, ViewProblem::NoOperator("a".into())));

    let (line, p) =
        problem("[views.a]\nfrom = \"t\"\nmax_by = { by = \"x\" }\nmin_by = { by = \"x\" }\n");
    assert_eq!((line, p), (2, ViewProblem::SeveralOperators("a".into())));

    let (line, p) = problem("\n\n[views.a]\nfrom = \"a\"\nmax_by = { by = \"x\" }\n");
    assert_eq!((line, p), (4, ViewProblem::SelfInput("a".into())));

    let (line, p) = problem(
        "[views.a]\nfrom = \"b\"\nmax_by = { by = \"x\" }\n[views.b]\nfrom = \"a\"\nmax_by = { by = \"x\" }\n",
    );
    assert!(matches!(p, ViewProblem::Cycle(_)));
    assert!(line == 2 || line == 5);

    let (line, p) =
        problem("[views.t]\nfrom = \"x\"\n\ntop_n = { order_by = [\"a\"], limit = 0 }\n");
    assert_eq!(line, 4);
    assert_eq!(
        p,
        ViewProblem::OutOfRange {
            what: "top_n.limit",
            value: 0,
            max: MAX_TOP_N_LIMIT
        }
    );

    let (line, p) = problem("[views.t]\nfrom = \"x\"\nhistory = { limit = 100000 }\n");
    assert_eq!(line, 3);
    assert!(matches!(
        p,
        ViewProblem::OutOfRange {
            what: "history.limit",
            ..
        }
    ));

    let (line, p) =
        problem("[views.t]\nfrom = \"x\"\ntop_n = { order_by = [\"a sideways\"], limit = 3 }\n");
    assert_eq!((line, p), (3, ViewProblem::BadOrderBy("a sideways".into())));

    let (line, p) = problem(
        "[views.g]\nfrom = \"x\"\n[views.g.group_by]\nby = [\"a\"]\naggregates = { s = \"median(b)\" }\n",
    );
    assert_eq!(p, ViewProblem::BadAggregate("median(b)".into()));
    assert!(line >= 3, "{line}");

    let (_, p) = problem(
        "[views.g]\nfrom = \"x\"\ngroup_by = { by = [\"a\"], aggregates = { a = \"count()\" } }\n",
    );
    assert_eq!(p, ViewProblem::AggregateNameClash("a".into()));

    let (_, p) = problem(
        "[views.g]\nfrom = \"x\"\ngroup_by = { by = [], aggregates = { n = \"count()\" } }\n",
    );
    assert_eq!(p, ViewProblem::EmptyList("group_by.by"));

    let (line, p) = problem(
        "[topics.ev]\nformat = \"events\"\n\n[views.t]\nfrom = \"ev\"\ntop_n = { order_by = [\"a\"], limit = 3 }\n",
    );
    assert_eq!(line, 5);
    assert!(matches!(
        p,
        ViewProblem::NeedsTable {
            operator: "top_n",
            ..
        }
    ));

    let (_, p) = problem("[topics.x]\n[views.x]\nfrom = \"y\"\nmax_by = { by = \"a\" }\n");
    assert_eq!(p, ViewProblem::NameClash("x".into()));

    let (_, p) = problem("[topics.\"a.t\"]\n[topics.\"b.t\"]\n");
    assert_eq!(p, ViewProblem::DuplicateTopicName("t".into()));

    let (_, p) = problem("[views.\"bad name\"]\nfrom = \"y\"\nmax_by = { by = \"a\" }\n");
    assert_eq!(p, ViewProblem::BadName("bad name".into()));

    let msg = ViewsFile::parse("[views.a]\nfrom = \"t\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("views file line 2: view \"a\" has no operator"),
        "{msg}"
    );
}

#[test]
fn toml_errors_and_unknown_keys_name_the_line() {
    for (text, line) in [
        (
            "[views.a]\nfrom = \"t\"\nmax_by = { by = \"x\", whatever = 1 }\n",
            "line 3",
        ),
        ("[views.a]\nfrom = \"t\"\nsort = 1\n", "line 3"),
        ("[topics.t]\nformat = \"avro\"\n", "line 2"),
        ("[views.a\n", "line 1"),
        ("\n[views.a]\nfrom = 5\nmax_by = { by = \"x\" }\n", "line 3"),
    ] {
        let err = ViewsFile::parse(text).unwrap_err();
        assert!(matches!(err, ViewsError::Toml(_)), "{text}: {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(line), "{text}: {msg}");
    }
    assert!(matches!(
        ViewsFile::parse(&"#".repeat(MAX_VIEWS_FILE_BYTES + 1)),
        Err(ViewsError::TooLarge(_))
    ));
    assert_eq!(ViewsFile::parse("").unwrap(), ViewsFile::default());
}

#[test]
fn aggregates_parse() {
    assert_eq!(parse_aggregate("count()"), Some((AggKind::Count, None)));
    assert_eq!(
        parse_aggregate(" COUNT( * ) "),
        Some((AggKind::Count, None))
    );
    assert_eq!(
        parse_aggregate("sum(amount)"),
        Some((AggKind::Sum, Some("amount".into())))
    );
    assert_eq!(
        parse_aggregate("latest( odd1 )"),
        Some((AggKind::Latest, Some("odd1".into())))
    );
    for bad in [
        "sum()",
        "sum(*)",
        "sum(a,b)",
        "sum(a",
        "suma)",
        "median(a)",
        "sum((a))",
        "",
    ] {
        assert_eq!(parse_aggregate(bad), None, "{bad}");
    }
}

#[test]
fn the_demo_views_file_is_valid() {
    let file = ViewsFile::parse(include_str!("../../../dev/demo/views.toml")).unwrap();
    let names: Vec<&str> = file.views.iter().map(|v| v.name.as_str()).collect();
    for want in [
        "biggest_movers",
        "odds_history",
        "leaderboard",
        "stakes_per_game",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }
    assert!(file
        .topics
        .iter()
        .any(|t| t.topic == "scores" && t.format == TopicFormat::Events));
}

#[test]
fn the_readme_views_example_is_valid() {
    let readme = include_str!("../../../README.md");
    let section = &readme[readme.find("\n## Views\n").expect("a Views section")..];
    let start = section.find("```toml\n").expect("a toml example") + "```toml\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];
    let file = ViewsFile::parse(text).unwrap();
    let order: Vec<&str> = file.views.iter().map(|v| v.name.as_str()).collect();
    let pos = |n: &str| order.iter().position(|v| *v == n).unwrap();
    assert!(
        pos("odds_moves") < pos("biggest_movers"),
        "inputs first: {order:?}"
    );
}
