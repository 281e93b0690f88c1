// Drives the portal in Debian's headless Chromium (playwright-core, no browser download).
// Usage: node portal_flow.js CONFIG_JSON. Prints one JSON line of what it saw on stdout;
// a failed step exits non-zero with the reason (and a screenshot of the page then).
"use strict";

const path = require("path");
const { chromium } = require("playwright-core");

const cfg = JSON.parse(process.argv[2]);
const STEP_MS = 30000;
const seen = { screenshots: [] };

async function shot(page, name) {
  const file = path.join(cfg.artifacts, `portal-${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  seen.screenshots.push(file);
}

const row = (page, table, event) => page.locator(`#${table} tbody tr[data-event="${event}"]`);

async function noticeText(page, pattern) {
  const notice = page.locator("#notice");
  await notice.filter({ hasText: pattern }).waitFor({ timeout: STEP_MS });
  return notice.textContent();
}

async function main() {
  const browser = await chromium.launch({
    executablePath: cfg.chromium,
    headless: true,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--disable-dev-shm-usage",
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  const consoleErrors = [];
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(`${m.text()} at ${m.location().url}`);
  });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(cfg.base)) external.push(r.url()); });
  try {
    // 1. The link opens the portal; the link leaves the address bar.
    const resp = await page.goto(cfg.link);
    seen.open_status = resp.status();
    seen.csp = resp.headers()["content-security-policy"];
    await page.locator("body[data-loaded]").waitFor();
    seen.tenant = await page.locator("#tenant").textContent();
    seen.url_after_open = page.url();
    await shot(page, "1-opened");

    // 2. Add an endpoint: its secret is shown once.
    await page.fill("#add-name", cfg.endpoint);
    await page.fill("#add-url", cfg.receiver);
    await page.fill("#add-source", "shop");
    await page.fill("#add-retries", "0");
    await page.click("#add-submit");
    await page.locator("#secret-box:not([hidden])").waitFor();
    seen.secret = await page.locator("#secret").textContent();
    const endpoint = page.locator(`#endpoints tr[data-name="${cfg.endpoint}"]`);
    await endpoint.waitFor();
    seen.endpoint_sources = await endpoint.locator(".sources").textContent();
    await shot(page, "2-endpoint-added");
    await page.click("#secret-done");

    // 3. A test event; its first attempt fails (the receiver answers 500): dead at once.
    await endpoint.locator("button.test").click();
    const sent = await noticeText(page, /Test event \S+ sent/);
    seen.test1 = sent.match(/Test event (\S+) sent/)[1];
    const failed = row(page, "deliveries", seen.test1).filter({ hasText: "dead" });
    await failed.first().waitFor();
    seen.failed_status = await failed.first().locator(".status-code").textContent();
    seen.failed_excerpt = await failed.first().locator(".excerpt").textContent();
    await shot(page, "3-delivery-failed");

    // 4. Retry it from the deliveries table: a delivered attempt appears.
    await failed.first().locator("button.retry").click();
    await noticeText(page, `Sent ${seen.test1}`);
    await row(page, "deliveries", seen.test1).filter({ hasText: "delivered" }).first().waitFor();
    await row(page, "deliveries", seen.test1).first().locator("button.request").click();
    await page.locator("#request-box:not([hidden])").waitFor();
    seen.request_shown = await page.locator("#request-body").textContent();
    await shot(page, "4-delivery-retried");

    // 5. A second test event fails into the dead letters; replay it from there.
    await endpoint.locator("button.test").click();
    const sent2 = await noticeText(page, new RegExp(`Test event (?!${seen.test1})\\S+ sent`));
    seen.test2 = sent2.match(/Test event (\S+) sent/)[1];
    const letter = row(page, "dead-letters", seen.test2);
    await letter.waitFor();
    await shot(page, "5-dead-letter");
    await letter.locator("button.replay").click();
    await noticeText(page, `Replayed ${seen.test2}`);
    await row(page, "deliveries", seen.test2).filter({ hasText: "delivered" }).first().waitFor();
    await letter.waitFor({ state: "detached" });
    await shot(page, "6-dead-letter-replayed");

    // 6. Edit the URL, pause and resume.
    await endpoint.locator("button.edit").click();
    await endpoint.locator("input.edit-url").fill(cfg.receiver2);
    await endpoint.locator("button.save").click();
    await noticeText(page, `Saved ${cfg.endpoint}`);
    await endpoint.locator(".url-text", { hasText: cfg.receiver2 }).waitFor();
    await endpoint.locator("button.pause").click();
    await endpoint.locator(".status", { hasText: "disabled" }).waitFor();
    seen.paused = true;
    await shot(page, "7-paused");
    await endpoint.locator("button.resume").click();
    await endpoint.locator(".status", { hasText: "active" }).waitFor();

    // 7. Rotate the secret: the new one is shown once.
    await endpoint.locator("button.rotate").click();
    await noticeText(page, `New secret for ${cfg.endpoint}`);
    seen.rotated_secret = await page.locator("#secret").textContent();
    await endpoint.locator(".status", { hasText: "rotating" }).waitFor();
    await shot(page, "8-secret-rotated");

    seen.console_errors = [...consoleErrors];
    // 8. Expired and tampered links are refused with a page that says so.
    for (const [name, link] of [["expired", cfg.expired], ["tampered", cfg.tampered]]) {
      const r = await page.goto(link);
      seen[`${name}_status`] = r.status();
      seen[`${name}_reason`] = await page.locator("#reason").textContent();
      await shot(page, `9-${name}-link`);
    }
    seen.external_requests = external;
    process.stdout.write(JSON.stringify(seen) + "\n");
  } catch (err) {
    await shot(page, "failure").catch(() => {});
    seen.console_errors = consoleErrors;
    process.stderr.write(`${err.stack || err}\nseen so far: ${JSON.stringify(seen)}\n`);
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

main();
