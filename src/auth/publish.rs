//! What a token allows to publish: the [`PublishContext`] of a WebSocket connection or an HTTP
//! request, from its verified [`Access`]. Without auth it is the default (every listed topic, no
//! principal, pins unchecked). With a token it is the token's `publish` list of names or globs
//! (none listed: no topic, fail closed), its `sub` as the principal that scopes publish ids, and
//! its claims, which pinned fields must match.

use super::Access;
use crate::publish::PublishContext;

impl Access {
    /// Who publishes with this access.
    pub fn publish_context(&self) -> PublishContext {
        match self {
            Access::Open => PublishContext::default(),
            Access::Token(g) => PublishContext {
                principal: g.sub.clone(),
                claims: Some(g.claims().clone()),
                topics: Some(g.publish_topics().to_vec()),
            },
        }
    }

    /// The topics this access may publish to, for the explain endpoint (`None`: every listed
    /// topic).
    pub fn publish_patterns(&self) -> Option<Vec<&str>> {
        match self {
            Access::Open => None,
            Access::Token(g) => Some(g.publish_topics().iter().map(|p| p.as_str()).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::auth::claims::Grant;

    fn access(claims: serde_json::Value) -> Access {
        let g = Grant::from_claims(claims.as_object().unwrap(), "livetable").unwrap();
        Access::Token(Arc::new(g))
    }

    #[test]
    fn a_token_names_the_principal_the_claims_and_the_topics() {
        let a = access(json!({"exp": 1, "sub": "u1", "livetable": {"publish": ["bets", "g_*"]}}));
        let ctx = a.publish_context();
        assert_eq!(ctx.principal.as_deref(), Some("u1"));
        assert_eq!(ctx.claims.as_ref().unwrap()["sub"], "u1");
        let topics: Vec<&str> = ctx
            .topics
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.as_str())
            .collect();
        assert_eq!(topics, ["bets", "g_*"]);
        assert_eq!(a.publish_patterns(), Some(vec!["bets", "g_*"]));
    }

    #[test]
    fn no_publish_list_is_no_topic_and_no_auth_is_every_topic() {
        let ctx = access(json!({"exp": 1, "sub": "u1", "livetable": {"tables": ["*"]}}))
            .publish_context();
        assert_eq!(ctx.topics.as_deref().map(<[_]>::len), Some(0));
        let open = Access::Open.publish_context();
        assert!(open.topics.is_none() && open.claims.is_none() && open.principal.is_none());
        assert_eq!(Access::Open.publish_patterns(), None);
    }
}
