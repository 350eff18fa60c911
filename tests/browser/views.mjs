// Browser check of the views panels (dev/demo/views.toml): headless Chromium loads the live page.
// usage: node views.mjs BASE_URL SCREENSHOT.png GAME ODD1 PLAYER SCORE
// Protocol with the Rust test on stdin/stdout, one line per step, "OK <step> <ms>" or
// "FAIL <reason>" (exit code 1):
//   ready   the biggest movers panel shows rows with a history sparkline, the high-score board
//           shows 5 players; then waits for a line "GO" (the test produced a move and a score)
//   moved   GAME is first among the biggest movers, shows ODD1 and a sparkline of >= 2 points
//   record  PLAYER is first on the high-score board with SCORE
import { launch } from "./launch.mjs";
import { createInterface } from "node:readline";

const [base, shot, game, odd1, player, score] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));

const browser = await launch();
let page;
try {
  page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.on("console", (m) => console.error(`[page] ${m.text()}`));
  await page.goto(base);
  let t0 = Date.now();
  await page.waitForFunction(() => {
    const movers = document.querySelectorAll("#movers-body tr");
    const board = document.querySelectorAll("#board-body tr");
    return !document.getElementById("views").hidden && movers.length > 0 && board.length === 5
      && movers[0].querySelector("svg.spark") !== null;
  }, undefined, { timeout: 20000, polling: 20 });
  console.log(`OK ready ${Date.now() - t0}`);
  if ((await nextLine()) !== "GO") throw new Error("no GO from the test");
  t0 = Date.now();
  await page.waitForFunction(({ game, odd1 }) => {
    const tr = document.querySelector("#movers-body tr");
    if (!tr || tr.dataset.key !== game) return false;
    const tds = [...tr.querySelectorAll("td")].map((td) => td.textContent);
    const points = Number(tr.querySelector("svg.spark")?.dataset.points ?? 0);
    return tds[0] === "1" && tds[2] === odd1 && points >= 2;
  }, { game, odd1 }, { timeout: 10000, polling: 10 });
  console.log(`OK moved ${Date.now() - t0}`);
  t0 = Date.now();
  await page.waitForFunction(({ player, score }) => {
    const tr = document.querySelector("#board-body tr");
    const tds = tr ? [...tr.querySelectorAll("td")].map((td) => td.textContent) : [];
    return tr && tr.dataset.key === player && tds[0] === "1" && tds[2] === score;
  }, { player, score }, { timeout: 10000, polling: 10 });
  console.log(`OK record ${Date.now() - t0}`);
  await page.screenshot({ path: shot });
} catch (e) {
  if (page) await page.screenshot({ path: shot.replace(/\.png$/, "-failed.png") }).catch(() => {});
  console.log(`FAIL ${e.message.split("\n")[0]}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
