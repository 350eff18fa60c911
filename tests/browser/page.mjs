// Browser test driver: Debian's Chromium (headless) loads livetable's live page.
// usage: node page.mjs BASE_URL SCREENSHOT.png
// Protocol with the Rust test on stdin/stdout: prints "READY <g1.odd1>" once row g1 is shown,
// waits for a line "GO" (the test has produced a change into Kafka), then waits up to 2 s for the
// new value on the page and prints "OK <ms>" or "FAIL <reason>".
import { launch } from "./launch.mjs";
import { createInterface } from "node:readline";

const [base, shot] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));

const browser = await launch();
let page;
try {
  page = await browser.newPage({ viewport: { width: 1100, height: 420 } });
  page.on("console", (m) => console.error(`[page] ${m.text()}`));
  await page.goto(base);
  // g1's odd1 cell, found by its column header (the page shows a key column only when no column
  // holds the key: here game_id does); with `want`, whether it shows that value
  const odd1 = (want) => {
    const head = [...document.querySelectorAll("#head th")].map((th) => th.textContent);
    const tr = document.querySelector('tr[data-key="g1"]');
    const v = tr && head.includes("odd1") ? tr.querySelectorAll("td")[head.indexOf("odd1")]?.textContent ?? null : null;
    return want === undefined ? v : v === want;
  };
  await page.waitForFunction(odd1, undefined, { timeout: 20000, polling: 20 });
  const heads = await page.locator("#head th").allTextContents();
  if (heads.includes("key")) throw new Error(`a key column next to game_id: ${heads.join(",")}`);
  const status = await page.locator("#status").textContent();
  if (status !== "open") throw new Error(`status is ${status}`);
  console.log(`READY ${await page.evaluate(odd1)}`);
  if ((await nextLine()) !== "GO") throw new Error("no GO from the test");
  const t0 = Date.now();
  await page.waitForFunction(odd1, "1.750", { timeout: 2000, polling: 10 });
  const ms = Date.now() - t0;
  await page.waitForTimeout(150); // let the highlight show in the screenshot
  await page.screenshot({ path: shot });
  console.log(`OK ${ms}`);
} catch (e) {
  if (page) await page.screenshot({ path: shot }).catch(() => {});
  console.log(`FAIL ${e.message.split("\n")[0]}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
