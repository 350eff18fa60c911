// Browser check: Debian's Chromium (headless) opens livetable's live page and, for each expected
// row, picks its table in the page's table selector and waits until the row shows the expected cells.
// usage: node shows.mjs BASE_URL SCREENSHOT_PREFIX '[{"table":T,"key":K,"cells":{"col":"text",...}},...]'
// Prints "OK <table>" per row, or "FAIL <reason>" (exit code 1). Screenshots SCREENSHOT_PREFIX-<table>.png.
import { launch } from "./launch.mjs";

const [base, shotPrefix, spec] = process.argv.slice(2);
const want = JSON.parse(spec);
const browser = await launch();
let page;
try {
  page = await browser.newPage({ viewport: { width: 1100, height: 420 } });
  page.on("console", (m) => console.error(`[page] ${m.text()}`));
  await page.goto(`${base}/?table=${encodeURIComponent(want[0].table)}`);
  for (const { table, key, cells } of want) {
    // the selector lists every table (it refreshes every 2 s while no table is shown)
    await page.waitForFunction((t) => [...document.querySelectorAll("#table option")].some((o) => o.value === t),
      table, { timeout: 20000, polling: 50 });
    if ((await page.locator("#table").inputValue()) !== table) await page.selectOption("#table", table);
    await page.waitForFunction(({ key, cells }) => {
      const head = [...document.querySelectorAll("#head th")].map((th) => th.textContent);
      const tr = [...document.querySelectorAll("#body tr")].find((r) => r.dataset.key === key);
      if (!tr) return false;
      const tds = [...tr.querySelectorAll("td")].map((td) => td.textContent);
      return Object.entries(cells).every(([c, v]) => head.includes(c) && tds[head.indexOf(c)] === v);
    }, { key, cells }, { timeout: 20000, polling: 20 });
    await page.screenshot({ path: `${shotPrefix}-${table}.png` });
    console.log(`OK ${table}`);
  }
} catch (e) {
  if (page) await page.screenshot({ path: `${shotPrefix}-failed.png` }).catch(() => {});
  console.log(`FAIL ${e.message.split("\n")[0]}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
