// Drives the dashboard in a real headless Chromium (Debian's, through playwright-core):
// log in, see the devices, see a chart with data, change a config and see it applied,
// send a command and see it succeed, see a refused command's error, upload a signed image,
// start an encrypted rollout and see every device run the new image, curtail the demo's
// feeder and release it, set a schedule (one refused) and see the device run it, phone width;
// no console errors on any page (a favicon is served), a chosen image survives refreshes, the
// Commands page shows a result as it happens (by long poll), the chart names its axis with a unit,
// the audit log reads as fields, the charts are the vendored uPlot (zoom by drag, a year from
// the rollups, the month's daily yield as bars), and at phone width no fleet column hides behind a scroll.
// Then HTTPS: a server with a certificate from `ecowatt tls init` (a private CA), which
// Chromium trusts by its key alone: log in over HTTPS with HSTS, plain HTTP to that port
// refused, and the login warning when a token would cross the network in clear.
// Screenshots go to ./screenshots. Needs: ECOWATT_BIN (the ecowatt binary), /usr/bin/chromium.
import { execFileSync, spawn } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import http from "node:http";
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const bin = process.env.ECOWATT_BIN || "../../target/debug/ecowatt";
const shots = new URL("./screenshots/", import.meta.url).pathname;
mkdirSync(shots, { recursive: true });
const dataDir = join(mkdtempSync(join(tmpdir(), "ecowatt-browser-")), "demo");

const demo = spawn(bin, ["demo", "--bind", "127.0.0.1:0", "--data-dir", dataDir, "--for", "300s", "--interval", "60s", "--start", "11:00"], {
  stdio: ["ignore", "pipe", "inherit"],
  env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
});
const link = await new Promise((resolve, reject) => {
  let out = "";
  const timer = setTimeout(() => reject(new Error("the demo printed no dashboard link:\n" + out)), 60000);
  demo.stdout.on("data", (d) => {
    out += d;
    const m = out.match(/dashboard\s+:\s+(\S+)/);
    if (m) { clearTimeout(timer); resolve(m[1]); }
  });
  demo.on("exit", (code) => reject(new Error(`demo exited (${code}):\n${out}`)));
});
const [base, token] = [link.split("#")[0], link.split("/login/")[1]];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.setDefaultTimeout(30000);
// Every console error and failed request, whatever the page (a missing favicon was one).
const consoleErrors = [];
page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
const notFound = [];
page.on("response", (r) => { if (r.status() === 404) notFound.push(r.url()); });
const requests = [];
page.on("request", (r) => requests.push(r.url()));
const results = [];
async function step(name, fn) {
  try {
    await fn();
    results.push([name, null]);
    console.log(`ok   ${name}`);
  } catch (e) {
    results.push([name, e]);
    console.log(`FAIL ${name}: ${e.message}`);
    await page.screenshot({ path: join(shots, `failed-${results.length}.png`), fullPage: true }).catch(() => {});
  }
}

try {
  await step("log in with a token", async () => {
    await page.goto(base);
    assert.equal(await page.$("#in-clear"), null, "warned about plain HTTP on this machine");
    await page.fill("#token", token);
    await page.keyboard.press("Enter");
    await page.waitForSelector("text=Fleet (3 devices)");
    // Fed by one request: the totals over the table, energy per device.
    const totals = await page.textContent("#fleettotals");
    assert.match(totals, /Power now [0-9.]+ kW · energy today [0-9.]+ kWh · [0-3] online/, totals);
    assert.ok((await page.textContent("#fleet")).includes(" kWh"), "energy today per device");
    await page.screenshot({ path: join(shots, "fleet.png"), fullPage: true });
  });
  await step("devices come online with power readings", async () => {
    await page.waitForFunction(() => [...document.querySelectorAll("tbody tr")].filter((r) => /online/.test(r.textContent) && / W/.test(r.textContent)).length === 3, null, { timeout: 60000 });
  });
  await step("a device page shows a chart with data, its axis named with a unit, and a tooltip", async () => {
    await page.click("text=inverter-1");
    await page.waitForFunction(() => /\d+ points/.test(document.querySelector("#chart")?.getAttribute("aria-label") || ""), null, { timeout: 60000 });
    const label = await page.getAttribute("#chart", "aria-label");
    assert.match(label, /^AC output power in W: \d+ points/);
    const options = await page.$$eval("#reg option", (o) => o.map((x) => x.textContent));
    assert.ok(options.includes("AC output power (W)") && options.includes("L1 phase voltage (V)"), options.join(" | "));
    assert.ok(!options.includes("Pow"), "registers by name, not by code");
    const box = await page.locator("#chart").boundingBox();
    await page.mouse.move(box.x + box.width * 0.8, box.y + box.height / 2);
    await page.waitForSelector("#tip:has-text(' W')");
    await page.screenshot({ path: join(shots, "device.png"), fullPage: true });
  });
  await step("the charts are uPlot, served by this server; nothing comes from elsewhere", async () => {
    assert.ok(requests.some((u) => u === `${base.replace(/\/$/, "")}/dashboard/uplot-1.6.32.min.js`), "the vendored uPlot was loaded");
    const foreign = requests.filter((u) => !u.startsWith(base.replace(/\/$/, "")) && !u.startsWith("data:") && !u.startsWith("blob:"));
    assert.deepEqual(foreign, [], "requests to other origins");
    assert.ok(await page.$("#chart .uplot canvas"), "the register chart is a uPlot chart");
  });
  await step("the daily yield of the month as bars, with its total and a tooltip", async () => {
    await page.waitForFunction(() => /^Daily yield in kWh: [1-9]\d* days? with data in \d{4}-\d{2}, [0-9.]+ kWh in all/.test(document.querySelector("#yield")?.getAttribute("aria-label") || ""));
    const label = await page.getAttribute("#yield", "aria-label");
    const total = Number(label.match(/, ([0-9.]+) kWh in all/)[1]);
    assert.ok(total > 0, label);
    // The same energy the fleet page shows for today (the demo began today), to the rounding of both.
    const fleet = await page.evaluate(async () => (await fetch("/api/v1/fleet", { headers: { Authorization: "Bearer " + sessionStorage.getItem("ecowatt.token") } })).json());
    const today = fleet.rows.find((r) => r.name === "inverter-1").energy_today_kwh;
    assert.ok(Math.abs(today - total) <= Math.max(0.002, today * 0.2), `yield ${total} against fleet today ${today}`);
    const day = new Date().getDate();
    await page.locator("#yield").scrollIntoViewIfNeeded();
    const box = await page.locator("#yield .u-over").boundingBox();
    const daysInMonth = new Date(new Date().getFullYear(), new Date().getMonth() + 1, 0).getDate();
    await page.mouse.move(box.x + box.width * (day - 0.5) / daysInMonth, box.y + box.height - 3);
    await page.waitForSelector("#yieldtip:has-text(' kWh')");
    assert.match(await page.textContent("#yieldtip"), new RegExp(`-${String(day).padStart(2, "0")} · [0-9.]+ kWh`));
  });
  await step("the chart zooms by dragging (fetching the finer data) and back; a year comes from the rollups", async () => {
    const before = requests.length;
    await page.locator("#chart").scrollIntoViewIfNeeded();
    const over = await page.locator("#chart .u-over").boundingBox();
    await page.mouse.move(over.x + over.width * 0.55, over.y + over.height / 2);
    await page.mouse.down();
    await page.mouse.move(over.x + over.width * 0.75, over.y + over.height / 2, { steps: 5 });
    await page.mouse.up();
    await page.waitForSelector("#zoomreset:not([hidden])");
    // (The page's refresh asks for the whole hour meanwhile.)
    const spans = requests.slice(before).filter((u) => u.includes("/inverter-1/telemetry?")).map((u) => {
      const q = new URL(u).searchParams;
      return Number(q.get("to_ms")) - Number(q.get("from_ms"));
    });
    assert.ok(spans.some((s) => s > 5 * 60000 && s < 20 * 60000), `a fifth of the hour fetched: ${spans}`);
    await page.click("#zoomreset");
    await page.waitForSelector("#zoomreset[hidden]", { state: "attached" });
    await page.selectOption("#range", { label: "1 year" });
    await page.waitForFunction(() => /^AC output power in W, \d+-(minute|hour|day) means: \d+ points?/.test(document.querySelector("#chart")?.getAttribute("aria-label") || ""));
    // A year at most 1,000 points: its days (8,760 hours would be 9 to a point).
    assert.match(await page.getAttribute("#chart", "aria-label"), /1-day means/, "a year of days");
    assert.ok(requests.some((u) => /\/inverter-1\/rollups\?.*max_points=1000/.test(u)), "from the rollups");
    await page.screenshot({ path: join(shots, "device-year.png"), fullPage: true });
    await page.selectOption("#range", { label: "1 hour" });
    await page.waitForFunction(() => /^AC output power in W: \d+ points/.test(document.querySelector("#chart")?.getAttribute("aria-label") || ""));
  });
  await step("a config change is applied by the device", async () => {
    await page.fill("#poll", "2");
    await page.click("#configform button");
    await page.waitForSelector("text=Applied: v3", { timeout: 60000 });
  });
  await step("a command succeeds and is confirmed, followed by long poll", async () => {
    await page.fill("#pct", "30");
    await page.click("#cmdform button");
    await page.waitForFunction(() => /set_power_percentage.*(succeeded|confirmed)/s.test(document.querySelector("#cmds")?.textContent || ""), null, { timeout: 60000 });
    const id = await page.$eval("#cmds tr[data-command]", (tr) => tr.dataset.command);
    assert.ok(requests.some((u) => u.includes(`/api/v1/commands/${id}?wait_ms=`)), "the result was waited for, not polled");
    await page.screenshot({ path: join(shots, "command.png"), fullPage: true });
  });
  await step("a refused command shows a clear error", async () => {
    await page.fill("#pct", "150");
    // The browser's own range check would stop the form; the API's message is what we test.
    await page.evaluate(() => document.querySelector("#pct").removeAttribute("max"));
    await page.click("#cmdform button");
    await page.waitForSelector("#error:has-text('outside 0..=100')");
  });
  await step("security events, firmware and audit pages render; audit details read as fields", async () => {
    await page.click("text=Audit log");
    await page.waitForSelector("text=command.queue");
    const detail = await page.$eval("#audit tbody tr", (tr) => tr.querySelector("td:last-child").innerText);
    assert.ok(!detail.includes("{") && !detail.includes('"'), `no raw JSON: ${detail}`);
    assert.ok(await page.$eval("#audit tbody tr td:last-child dl.kv", (dl) => dl.scrollWidth <= dl.clientWidth + 1), "not clipped");
    await page.screenshot({ path: join(shots, "audit.png"), fullPage: true });
    await page.click("text=Security events");
    await page.waitForSelector("h2:has-text('Security events')");
    await page.click("nav >> text=Firmware");
    await page.waitForSelector("h2:has-text('Firmware images')");
  });
  await step("a signed image is uploaded (the chosen files survive refreshes); a tampered one is refused", async () => {
    const image = join(dataDir, "..", "fw.bin");
    writeFileSync(image, Buffer.alloc(50000, 7));
    execFileSync(bin, ["firmware", "sign", image, "--version", "1.1.0", "--key", join(dataDir, "firmware-signing.key")]);
    await page.click("nav >> text=Firmware");
    await page.setInputFiles("#fwimage", image);
    await page.setInputFiles("#fwmanifest", image + ".manifest.json");
    // Focus elsewhere, and wait over two refreshes (every 3 s): the choice stays.
    await page.click("h2:has-text('Rollouts')");
    const before = requests.filter((u) => u.endsWith("/api/v1/rollouts")).length;
    await page.waitForFunction((n) => performance.getEntriesByType("resource").filter((e) => e.name.endsWith("/api/v1/rollouts")).length >= n + 2, before, { timeout: 15000 });
    assert.equal(await page.$eval("#fwimage", (i) => i.files.length), 1, "the image is still chosen");
    assert.equal(await page.$eval("#fwmanifest", (i) => i.files.length), 1, "the manifest is still chosen");
    await page.click("#fwform button");
    await page.waitForSelector("td:has-text('1.1.0')");
    await page.screenshot({ path: join(shots, "firmware.png"), fullPage: true });
    writeFileSync(image, Buffer.alloc(50000, 8));
    await page.setInputFiles("#fwimage", image);
    await page.setInputFiles("#fwmanifest", image + ".manifest.json");
    await page.click("#fwform button");
    await page.waitForSelector("#error:has-text('image_mismatch')");
  });
  await step("an encrypted rollout is started in two waves and every device runs the new image", async () => {
    await page.click("nav >> text=Firmware");
    await page.waitForSelector("#roform");
    await page.selectOption("#rofw", { label: "1.1.0 (linux-x86_64)" });
    await page.selectOption("#rodevices", ["inverter-1", "inverter-2", "inverter-3"]);
    await page.fill("#rowaves", "34,100");
    await page.check("#roencrypt");
    await page.click("#roform button");
    await page.waitForSelector("h2:has-text('Rollout 1: 1.1.0')");
    await page.waitForSelector("h2:has-text('(encrypted delivery)')");
    await page.waitForSelector("#rostate:has-text('completed')", { timeout: 90000 });
    const states = await page.$$eval("[data-device-state]", (tds) => tds.map((td) => td.textContent));
    assert.deepEqual(states, ["succeeded", "succeeded", "succeeded"]);
    await page.screenshot({ path: join(shots, "rollout.png"), fullPage: true });
    await page.click("nav >> text=Fleet");
    await page.waitForFunction(() => [...document.querySelectorAll("tbody tr")].filter((r) => /1\.1\.0/.test(r.textContent)).length === 3);
  });
  await step("a group is curtailed and released, with confirmations counted live", async () => {
    await page.click("nav >> text=Curtailment");
    await page.waitForSelector("#curtailform");
    await page.fill("#cgroup", "nobody");
    await page.fill("#cpct", "30");
    await page.click("#curtailform button");
    await page.waitForSelector("#error:has-text('group_empty')");
    await page.fill("#cgroup", "demo-feeder");
    await page.fill("#cpct", "25");
    await page.click("#curtailform button");
    await page.waitForSelector("[data-curtailment='1']:has-text('3/3 confirmed')", { timeout: 60000 });
    await page.screenshot({ path: join(shots, "curtailment.png"), fullPage: true });
    await page.click("button[data-release='1']");
    await page.waitForSelector("[data-curtailment='2']:has-text('3/3 confirmed')", { timeout: 60000 });
    assert.equal(await page.$$eval("button[data-release]", (b) => b.length), 0, "released once");
  });
  await step("a schedule is refused when entries overlap, then set and run by the device", async () => {
    await page.goto(`${base}#/device/inverter-1`);
    await page.waitForSelector("#schedform");
    await page.fill("#schedtz", "Europe/Berlin");
    await page.fill("#schedentries", "daily 00:00-12:00 35%\ndaily 11:00-24:00 35%");
    await page.click("#schedform button[type=submit]");
    await page.waitForSelector("#error:has-text('schedule_overlap')");
    await page.fill("#schedentries", "daily 00:00-12:00 35%\ndaily 12:00-24:00 35%");
    await page.click("#schedform button[type=submit]");
    await page.waitForSelector("#schedactive:has-text('35%')");
    await page.waitForSelector("#schedsource:has-text('the schedule')", { timeout: 60000 });
    await page.screenshot({ path: join(shots, "schedule.png"), fullPage: true });
  });
  await step("the Commands page sends a command and shows its result as it happens", async () => {
    await page.click("nav >> text=Commands");
    await page.waitForSelector("#sendform");
    await page.selectOption("#senddevice", "inverter-2");
    await page.selectOption("#sendtype", "set_power_percentage");
    await page.fill("#sendvalue", "150");
    await page.evaluate(() => document.querySelector("#sendvalue").removeAttribute("max"));
    await page.click("#sendform button");
    await page.waitForSelector("#error:has-text('outside 0..=100')");
    assert.equal(await page.inputValue("#sendvalue"), "150", "a refused value stays for correction");
    await page.fill("#sendvalue", "45");
    await page.click("#sendform button");
    await page.waitForSelector("#allcmds tr[data-command]:first-child :text('inverter-2')");
    const id = await page.$eval("#allcmds tr[data-command]", (tr) => tr.dataset.command);
    await page.waitForSelector(`[data-command-status="${id}"]:text-matches("succeeded|confirmed")`, { timeout: 60000 });
    assert.ok(requests.some((u) => u.includes(`/api/v1/commands/${id}?wait_ms=`)), "followed by long poll");
    assert.match(await page.textContent("#cmdstats"), /^\d+ in all · /);
    await page.selectOption("#fstatus", "failed");
    await page.waitForSelector("#allcmds:has-text('No commands match')");
    await page.selectOption("#fstatus", "");
    await page.screenshot({ path: join(shots, "commands.png"), fullPage: true });
  });
  await step("readable at phone width (no column behind a scroll), usable by keyboard", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    const asked = [];
    const listen = (r) => { const u = new URL(r.url()); if (u.pathname.startsWith("/api/")) asked.push(u.pathname); };
    page.on("request", listen);
    await Promise.all([page.waitForResponse((r) => r.url().endsWith("/api/v1/fleet")), page.click("text=Fleet")]);
    await page.waitForSelector("text=Fleet (3 devices)");
    await page.waitForTimeout(300);
    page.off("request", listen);
    assert.deepEqual(asked, ["/api/v1/fleet"], "the fleet page is one request, not one per device");
    const hidden = await page.$$eval("#fleet tbody tr td", (tds) => tds.filter((td) => {
      const r = td.getBoundingClientRect();
      return r.right > window.innerWidth + 1 || r.left < -1;
    }).map((td) => td.dataset.label));
    assert.deepEqual(hidden, [], "cells outside the screen");
    assert.ok(await page.$eval("#fleet", (t) => t.parentElement.scrollWidth <= t.parentElement.clientWidth + 1), "no sideways scroll");
    const shownLabels = await page.$$eval("#fleet tbody tr:first-child td", (tds) => tds.map((td) => getComputedStyle(td, "::before").content));
    assert.ok(shownLabels.includes('"AC power"') && shownLabels.includes('"Energy today"') && shownLabels.includes('"Firmware"') && shownLabels.includes('"Alarms"'), shownLabels.join(" "));
    await page.keyboard.press("Tab");
    const focused = await page.evaluate(() => document.activeElement?.tagName);
    assert.ok(["A", "BUTTON"].includes(focused), `Tab focuses a link or button, got ${focused}`);
    await page.screenshot({ path: join(shots, "fleet-phone.png"), fullPage: true });
  });
  await step("no console errors on any page (favicon served)", async () => {
    const icon = await page.evaluate(async () => (await fetch("/favicon.ico")).headers.get("content-type"));
    assert.equal(icon, "image/svg+xml");
    assert.deepEqual(notFound, [], "requests answered 404");
    // The refusals this test provokes on purpose (400, 409, 422) are the only errors.
    assert.deepEqual(consoleErrors.filter((e) => !/status of (400|409|422)/.test(e)), []);
  });
} finally {
  await browser.close();
}

// HTTPS. `*.test` names resolve to 127.0.0.1 inside this browser only.
const work = join(dataDir, "..");
const pki = join(work, "pki");
execFileSync(bin, ["tls", "init", "--host", "dashboard.test", "--out", pki], { stdio: "ignore" });
const serverKey = new X509Certificate(readFileSync(join(pki, "server.pem"))).publicKey;
const spki = createHash("sha256").update(serverKey.export({ type: "spki", format: "der" })).digest("base64");
const tlsData = join(work, "tls-data");
const tlsServer = spawn(bin, ["server", "--bind", "127.0.0.1:0", "--data-dir", tlsData, "--tls-cert", join(pki, "server.pem"), "--tls-key", join(pki, "server.key")], {
  stdio: ["ignore", "pipe", "inherit"],
  env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "warn" },
});
const tlsPort = await new Promise((resolve, reject) => {
  let out = "";
  const timer = setTimeout(() => reject(new Error("the HTTPS server printed no address:\n" + out)), 60000);
  tlsServer.stdout.on("data", (d) => {
    out += d;
    const m = out.match(/EcoWatt server on https:\/\/127\.0\.0\.1:(\d+)/);
    if (m) { clearTimeout(timer); resolve(m[1]); }
  });
  tlsServer.on("exit", (code) => reject(new Error(`the HTTPS server exited (${code}):\n${out}`)));
});
const demoPort = new URL(base).port;
const secure = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP *.test 127.0.0.1", `--ignore-certificate-errors-spki-list=${spki}`],
});
const tab = await secure.newPage({ viewport: { width: 1280, height: 900 } });
tab.setDefaultTimeout(30000);
try {
  await step("over HTTPS (a private CA's certificate) the dashboard logs in, with HSTS and no warning", async () => {
    const resp = await tab.goto(`https://dashboard.test:${tlsPort}/`);
    assert.equal(resp.status(), 200);
    assert.equal(resp.headers()["strict-transport-security"], "max-age=31536000");
    assert.match(resp.headers()["content-security-policy"], /frame-ancestors 'none'/);
    assert.equal(resp.headers()["referrer-policy"], "no-referrer");
    assert.equal(await tab.evaluate(() => location.protocol), "https:");
    await tab.waitForSelector("#token");
    assert.equal(await tab.$("#in-clear"), null, "warned about plain HTTP over HTTPS");
    await tab.fill("#token", readFileSync(join(tlsData, "admin.token"), "utf8").trim());
    await tab.keyboard.press("Enter");
    await tab.waitForSelector("text=Fleet (0 devices)");
    await tab.screenshot({ path: join(shots, "https-fleet.png"), fullPage: true });
  });
  await step("HSTS: told http:// for that host, the browser goes to https:// itself", async () => {
    const resp = await tab.goto(`http://dashboard.test:${tlsPort}/`);
    assert.equal(resp.status(), 200);
    assert.equal(await tab.evaluate(() => location.protocol), "https:");
  });
  await step("plain HTTP to the HTTPS port (no HSTS in that client) is refused with https_required", async () => {
    const { status, body } = await new Promise((resolve, reject) => {
      http.get({ host: "127.0.0.1", port: tlsPort, path: "/" }, (res) => {
        let body = "";
        res.on("data", (d) => (body += d));
        res.on("end", () => resolve({ status: res.statusCode, body }));
      }).on("error", reject);
    });
    assert.equal(status, 400);
    assert.equal(JSON.parse(body).error.code, "https_required");
  });
  await step("over plain HTTP from another host the login warns that the token travels in clear", async () => {
    await tab.goto(`http://plain.test:${demoPort}/`);
    await tab.waitForSelector("#in-clear");
    assert.match(await tab.textContent("#in-clear"), /plain HTTP/);
    await tab.screenshot({ path: join(shots, "in-clear-warning.png"), fullPage: true });
  });
} finally {
  await secure.close();
  tlsServer.kill("SIGINT");
  demo.kill("SIGINT");
}
const failed = results.filter(([, e]) => e).length;
console.log(`screenshots: ${shots}`);
console.log(`${results.length - failed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
