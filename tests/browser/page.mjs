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
  const cell = page.locator('tr[data-key="g1"] td:nth-child(3)');
  await cell.waitFor({ timeout: 20000 });
  const status = await page.locator("#status").textContent();
  if (status !== "open") throw new Error(`status is ${status}`);
  console.log(`READY ${await cell.textContent()}`);
  if ((await nextLine()) !== "GO") throw new Error("no GO from the test");
  const t0 = Date.now();
  await page.waitForFunction(
    () => document.querySelector('tr[data-key="g1"] td:nth-child(3)')?.textContent === "1.750",
    null, { timeout: 2000, polling: 10 });
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
