// Browser check of livetable.js's subscribe(): in headless Chromium, a LiveTable created for TABLE_A
// switches to TABLE_B while still connecting, then switches between the two ROUNDS times on the
// open connection, each time waiting for the new table's snapshot.
// usage: node switch.mjs BASE_URL TABLE_A TABLE_B ROUNDS
// Prints "OK switched <rounds>" once done (the page then holds TABLE_B), or "FAIL <reason>"
// (exit code 1); then waits for a line on stdin before it closes the browser.
import { createInterface } from "node:readline";
import { launch } from "./launch.mjs";

const [base, a, b, rounds] = process.argv.slice(2);
const lines = createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once("line", resolve));
const browser = await launch();
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.error(`[page] ${m.text()}`));
  // the client library alone (the live page would open a connection of its own), same origin
  await page.goto(`${base}/livetable.js`);
  const result = await page.evaluate(async ({ base, a, b, rounds }) => {
    const { LiveTable } = await import(`${base}/livetable.js`);
    const lt = new LiveTable(base.replace("http", "ws") + "/ws", { table: a });
    const errors = [];
    lt.addEventListener("error", (e) => errors.push(e.detail.code));
    const snapshotOf = (table) => new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no snapshot of ${table} within 10 s`)), 10000);
      const on = (e) => {
        if (e.detail.table !== table) return;
        clearTimeout(t);
        lt.removeEventListener("snapshot", on);
        resolve();
      };
      lt.addEventListener("snapshot", on);
    });
    window.lt = lt;
    lt.connect();
    // still connecting: the subscription must become b's
    let got = snapshotOf(b);
    lt.subscribe(b);
    await got;
    for (let i = 0; i < Number(rounds); i++) {
      // a switch is two messages: paced under the server's --max-messages-per-sec (50)
      await new Promise((r) => setTimeout(r, 60));
      const next = i % 2 === 0 ? a : b;
      got = snapshotOf(next);
      lt.subscribe(next);
      await got;
    }
    if (lt.table !== b) {
      got = snapshotOf(b);
      lt.subscribe(b);
      await got;
    }
    // patches after the last snapshot belong to b only
    return { errors, table: lt.table, rows: Object.keys(lt.rows).length };
  }, { base, a, b, rounds });
  if (result.errors.length) throw new Error(`error events: ${result.errors.join(",")}`);
  if (result.table !== b || result.rows === 0) throw new Error(`holds ${result.table} with ${result.rows} rows`);
  console.log(`OK switched ${rounds}`);
  await nextLine();
} catch (e) {
  console.log(`FAIL ${e.message.split("\n")[0]}`);
  process.exitCode = 1;
} finally {
  lines.close();
  await browser.close();
}
