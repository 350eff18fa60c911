// Browser check of the bet slip: two pages of livetable's live page in headless Chromium (two
// browser contexts: two visitors). Page A places bets; page B, which never clicks, must show the
// stakes change. usage: node bet.mjs BASE_URL SCREENSHOT_PREFIX
// Prints one line per step: "OK <step> <ms>" or "FAIL <reason>" (exit code 1). Steps:
//   ready    both pages show game g1 with odd1 1.500 and the (empty) stakes panel
//   first    A bets 25 on g1/odd1: A's slip says accepted, B shows g1: 1 bet, 25.00, payout 37.50
//   second   A bets 5 on g1/odd1: B shows g1: 2 bets, 30.00, payout 45.00
//   refused  A bets 20000 (over the schema's maximum): A's slip says "refused: invalid", B's stakes stay
// Screenshots SCREENSHOT_PREFIX-a.png and SCREENSHOT_PREFIX-b.png.
import { launch } from "./launch.mjs";

const [base, shotPrefix] = process.argv.slice(2);
const browser = await launch();
const pages = [];

// the stakes row of `game` on `page` equals [bets, stake, payout]
const stakes = (page, game, want, timeout) =>
  page.waitForFunction(({ game, want }) => {
    const tr = document.querySelector(`#stakes-body tr[data-game="${game}"]`);
    const got = tr ? [...tr.querySelectorAll("td")].slice(1).map((td) => td.textContent) : null;
    return got !== null && got.join("|") === want.join("|");
  }, { game, want }, { timeout, polling: 10 });

async function bet(page, stake) {
  await page.fill("#bet-stake", String(stake));
  await page.evaluate(() => { document.getElementById("bet-result").textContent = ""; });
  await page.click("#bet-place");
  await page.waitForFunction(() => {
    const t = document.getElementById("bet-result").textContent;
    return t.startsWith("accepted") || t.startsWith("refused");
  }, undefined, { timeout: 15000, polling: 10 });
  return page.locator("#bet-result").textContent();
}

try {
  for (const name of ["a", "b"]) {
    const ctx = await browser.newContext({ viewport: { width: 1100, height: 560 } });
    const page = await ctx.newPage();
    page.on("console", (m) => console.error(`[page ${name}] ${m.text()}`));
    await page.goto(`${base}/?table=game_odds`);
    pages.push(page);
  }
  const [a, b] = pages;
  let t0 = Date.now();
  for (const page of pages) {
    await page.waitForSelector("#side", { state: "visible", timeout: 20000 });
    await page.waitForFunction(() => document.getElementById("bet-odds").textContent === "1.500"
      && document.getElementById("bet-game").selectedOptions[0]?.textContent === "g1"
      && document.getElementById("bet-pick").value === "odd1", undefined, { timeout: 20000, polling: 20 });
  }
  console.log(`OK ready ${Date.now() - t0}`);

  t0 = Date.now();
  const first = await bet(a, 25);
  if (!first.startsWith("accepted (partition ")) throw new Error(`first bet: ${first}`);
  await stakes(b, "g1", ["1", "25.00", "37.50"], 5000);
  console.log(`OK first ${Date.now() - t0}`);

  t0 = Date.now();
  const second = await bet(a, 5);
  if (!second.startsWith("accepted")) throw new Error(`second bet: ${second}`);
  await stakes(b, "g1", ["2", "30.00", "45.00"], 5000);
  await stakes(a, "g1", ["2", "30.00", "45.00"], 5000);
  console.log(`OK second ${Date.now() - t0}`);

  t0 = Date.now();
  const third = await bet(a, 20000);
  if (!third.startsWith("refused: invalid")) throw new Error(`a stake over the maximum: ${third}`);
  await b.waitForTimeout(300);
  await stakes(b, "g1", ["2", "30.00", "45.00"], 1000);
  console.log(`OK refused ${Date.now() - t0}`);
  await a.screenshot({ path: `${shotPrefix}-a.png` });
  await b.screenshot({ path: `${shotPrefix}-b.png` });
} catch (e) {
  for (const [i, page] of pages.entries()) await page.screenshot({ path: `${shotPrefix}-${"ab"[i]}-failed.png` }).catch(() => {});
  console.log(`FAIL ${e.message.split("\n")[0]}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
