// Browser test of the contextd console (console/ served by the binary).
//
//   node tests/browser/console.test.mjs
//
// Starts the real binary in embedded mode on a free port with a fresh data
// directory, seeds data through the HTTP API and drives the console with
// Debian's chromium through playwright-core (no browser download).
//
// Environment:
//   CONTEXTD_BIN     the binary (default /root/.cache/contextd/target/release/contextd)
//   CHROMIUM_PATH    the browser (default /usr/bin/chromium)
//   KEEP_DATA=1      keep the temporary data directory
//
// Exit status 0 when every step passed; otherwise 1 with the failing step,
// the reason and the tail of contextd's output.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const BIN = process.env.CONTEXTD_BIN || '/root/.cache/contextd/target/release/contextd';
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SHOTS = path.join(HERE, 'screenshots');
const WAIT_MS = 20_000;        // one UI expectation
const READY_MS = 90_000;       // contextd start-up
const TOTAL_MS = 300_000;      // whole test

let child = null;
let childLog = '';
let browser = null;
let dataDir = null;
let currentStep = 'start-up';

function log(msg) { process.stdout.write(msg + '\n'); }

function killChild() {
  if (child && child.exitCode === null && child.signalCode === null) {
    try { child.kill('SIGKILL'); } catch { /* gone */ }
  }
}
process.on('exit', killChild);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { killChild(); process.exit(130); });
}

function fail(msg) { throw new Error(msg); }

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function step(name, fn) {
  currentStep = name;
  const t0 = Date.now();
  await fn();
  log(`  ok  ${name} (${Date.now() - t0} ms)`);
}

// Polls fn until it returns a truthy value.
async function until(what, fn, timeout = WAIT_MS, every = 200) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) { last = e; }
    if (Date.now() > deadline) fail(`timed out after ${timeout} ms waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
    await sleep(every);
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// ------------------------------------------------------------- HTTP helpers

let BASE = '';

async function http(method, p, body, expect) {
  const res = await fetch(BASE + p, {
    method,
    headers: body === undefined ? {} : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (expect !== undefined && res.status !== expect) {
    fail(`${method} ${p} answered ${res.status}, expected ${expect}: ${text.slice(0, 500)}`);
  }
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  return { status: res.status, json, text };
}

const iso = (msAgo) => new Date(Date.now() - msAgo).toISOString();

// ------------------------------------------------------------------- test

async function main() {
  if (!fs.existsSync(BIN)) fail(`contextd binary not found at ${BIN} (build it with cargo build --release, or set CONTEXTD_BIN)`);
  if (!fs.existsSync(CHROMIUM)) fail(`chromium not found at ${CHROMIUM} (apt-get install -y chromium chromium-driver, or run tests/browser/run.sh)`);
  let chromium;
  try {
    ({ chromium } = await import('playwright-core'));
  } catch (e) {
    fail(`playwright-core is not installed: run "npm ci" in ${HERE} (${e.message})`);
  }
  fs.mkdirSync(SHOTS, { recursive: true });

  await step('start contextd (embedded mode)', async () => {
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'contextd-browser-'));
    const port = await freePort();
    BASE = `http://127.0.0.1:${port}`;
    child = spawn(BIN, ['run', '--data-dir', dataDir, '--http-addr', `127.0.0.1:${port}`], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
    });
    const keep = (d) => { childLog = (childLog + d.toString()).slice(-20_000); };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    let exited = null;
    child.on('exit', (code, sig) => { exited = `exited with ${sig || code}`; });
    child.on('error', (e) => { exited = `failed to start: ${e.message}`; });
    await until('GET /readyz to answer 200', async () => {
      if (exited) fail(`contextd ${exited}`);
      const r = await fetch(BASE + '/readyz').catch(() => null);
      return r && r.status === 200;
    }, READY_MS, 250);
  });

  await step('console assets are served', async () => {
    const idx = await http('GET', '/', undefined, 200);
    if (!idx.text.includes('id="view-events"')) fail('GET / does not serve the console (no #view-events; was the binary built from the current console/?)');
    await http('GET', '/console/app.js', undefined, 200);
    await http('GET', '/console/style.css', undefined, 200);
  });

  await step('seed data through the HTTP API', async () => {
    await http('POST', '/api/v2/zendesk/events', {
      id: 'zd-article-1', user_id: '12345', type: 'article_viewed', created_at: iso(5 * 60_000),
      properties: { article: { display_name: 'Reset your password' } },
    }, 202);
    await http('POST', '/api/v2/users/12345/events', {
      profile: { source: 'shop', type: 'customer', name: 'Jane', identifiers: [{ type: 'email', value: 'jane@example.com' }] },
      event: { source: 'shop', type: 'order_completed', description: 'Order #1001', created_at: iso(2 * 60_000), properties: {} },
    }, 202);
    // Many attributes (nested too), for the "View all" button.
    const attributes = { tier: 'gold', address: { city: 'Berlin', zip: '10115' } };
    for (let i = 1; i <= 10; i++) attributes[`field_${String(i).padStart(2, '0')}`] = `value ${i}`;
    await http('PUT', '/api/v2/user_profiles?identifier=' + encodeURIComponent('shop:customer:email:jane@example.com'), {
      profile: {
        source: 'shop', type: 'customer', name: 'Jane',
        identifiers: [{ type: 'email', value: 'jane@example.com' }, { type: 'external_id', value: 'C-77' }],
        attributes,
      },
    }, 202);
    // A user created from an identifier: its user id is "email:solo@example.com".
    await http('POST', '/api/v2/user_profiles/events', {
      profile: { source: 'shop', type: 'customer', name: 'Solo', identifiers: [{ type: 'email', value: 'solo@example.com' }] },
      event: { source: 'shop', type: 'order_completed', description: 'Order #2001', created_at: iso(60_000), properties: { total: '10.00' } },
    }, 202);
    await until('the seeded types in /api/admin/event_types and /api/admin/profile_types', async () => {
      const ev = (await http('GET', '/api/admin/event_types', undefined, 200)).json.event_types || [];
      const pr = (await http('GET', '/api/admin/profile_types', undefined, 200)).json.profile_types || [];
      const has = (l, s, t) => l.some((x) => x.source === s && x.type === t);
      const orders = ev.find((x) => x.source === 'shop' && x.type === 'order_completed');
      return has(ev, 'zendesk', 'article_viewed') && orders && orders.count >= 2 && has(pr, 'shop', 'customer');
    });
    await until('the profile PUT to be applied (external_id:C-77 linked)', async () => {
      const r = await http('GET', '/api/v2/users/lookup?identifier=' + encodeURIComponent('external_id:C-77'));
      return r.status === 200;
    });
  });

  await step('launch chromium', async () => {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
  });
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  // The console must not touch anything but its own origin.
  const foreign = [];
  await context.route('**/*', (route) => {
    const u = route.request().url();
    if (!u.startsWith(BASE + '/')) { foreign.push(u); return route.abort(); }
    return route.continue();
  });
  const admin = await context.newPage();
  const pageErrors = [];
  admin.on('pageerror', (e) => pageErrors.push(`admin page: ${e.message}`));

  const status = (page, id) => page.locator(`#${id}`).textContent();
  const savedRe = /^Saved — in effect at \d\d:\d\d:\d\d$/;

  async function saveAndWait(page, button, statusId) {
    await page.click(button);
    await until(`"Saved — in effect at HH:MM:SS" in #${statusId}`, async () => {
      const t = (await status(page, statusId)).trim();
      if (/failed/i.test(t)) fail(`save failed: ${t}`);
      return savedRe.test(t);
    });
  }

  await step('Admin > Events lists the types and saves visibility', async () => {
    await admin.goto(BASE + '/#/events');
    const zdRow = admin.locator('[data-testid=event-type-row][data-source="zendesk"][data-type="article_viewed"]');
    await zdRow.waitFor({ timeout: WAIT_MS });
    if ((await zdRow.locator('[data-testid=type-count]').textContent()).trim() !== '1') fail('article_viewed count is not 1');
    if (await admin.locator('#nav-events').getAttribute('aria-selected') !== 'true') fail('Events tab is not aria-selected');
    // Nothing is shown before any settings exist.
    if (await admin.isChecked('#zendesk-events-enabled')) fail('Zendesk events switch starts on');
    const zdBox = zdRow.locator('input[type=checkbox]');
    if (await zdBox.isChecked()) fail('article_viewed starts ticked');
    await admin.check('#zendesk-events-enabled');
    // Tick through the <label for>, as a user would.
    await zdRow.locator('label').click();
    if (!(await zdBox.isChecked())) fail('clicking the type label did not tick it');
    // Custom events tab, switched with the keyboard.
    await admin.focus('#tab-zendesk-events');
    await admin.keyboard.press('ArrowRight');
    if (await admin.locator('#tab-custom-events').getAttribute('aria-selected') !== 'true') fail('ArrowRight did not select the Custom events tab');
    if (!(await admin.isHidden('#panel-zendesk-events'))) fail('Zendesk panel still visible on the Custom tab');
    const orderRow = admin.locator('[data-testid=event-type-row][data-source="shop"][data-type="order_completed"]');
    await orderRow.waitFor({ state: 'visible', timeout: WAIT_MS });
    if ((await orderRow.locator('[data-testid=type-count]').textContent()).trim() !== '2') fail('order_completed count is not 2');
    await admin.check('#events-api-enabled');
    await orderRow.locator('input[type=checkbox]').check();
    await saveAndWait(admin, '#save-events', 'events-status');
    const vis = (await http('GET', '/api/admin/visibility', undefined, 200)).json;
    if (!vis.zendesk_events || !vis.events_api || vis.profiles_api) fail(`unexpected switches after save: ${JSON.stringify(vis)}`);
    const keys = vis.shown_event_types.map((t) => `${t.source}/${t.type}`).sort().join(',');
    if (keys !== 'shop/order_completed,zendesk/article_viewed') fail(`unexpected shown_event_types: ${keys}`);
    await admin.screenshot({ path: path.join(SHOTS, 'events.png'), fullPage: true });
  });

  await step('Admin > Profiles saves and keeps the event settings', async () => {
    await admin.click('#nav-profiles');
    await until('#/profiles', async () => admin.url().endsWith('#/profiles'));
    const row = admin.locator('[data-testid=profile-type-row][data-source="shop"][data-type="customer"]');
    await row.waitFor({ timeout: WAIT_MS });
    await admin.check('#profiles-api-enabled');
    await row.locator('input[type=checkbox]').check();
    await saveAndWait(admin, '#save-profiles', 'profiles-status');
    const vis = (await http('GET', '/api/admin/visibility', undefined, 200)).json;
    if (!vis.profiles_api || !vis.zendesk_events || !vis.events_api) fail(`switches not kept: ${JSON.stringify(vis)}`);
    if (vis.shown_event_types.length !== 2) fail(`event types not kept by the profile save: ${JSON.stringify(vis.shown_event_types)}`);
    if (JSON.stringify(vis.shown_profile_types) !== '[{"source":"shop","type":"customer"}]') fail(`shown_profile_types: ${JSON.stringify(vis.shown_profile_types)}`);
    await admin.screenshot({ path: path.join(SHOTS, 'profiles.png'), fullPage: true });
  });

  // The agent's card, open in its own tab for the rest of the test.
  const card = await context.newPage();
  card.on('pageerror', (e) => pageErrors.push(`card page: ${e.message}`));
  const ev = (type, extra = '') => card.locator(`#timeline [data-testid=event][data-type="${type}"]${extra}`);
  const summaries = async () => (await card.locator('#timeline [data-testid=event-summary]').allTextContents()).map((s) => s.trim());

  await step('customer card shows the shown event types and profile', async () => {
    await card.goto(BASE + '/#/customer');
    await card.fill('#customer-search', '12345');
    await card.press('#customer-search', 'Enter');
    await until('#/customer/12345', async () => card.url().endsWith('#/customer/12345'));
    await ev('article_viewed').waitFor({ timeout: WAIT_MS });
    await ev('order_completed').waitFor({ timeout: WAIT_MS });
    const s = await summaries();
    if (JSON.stringify(s) !== JSON.stringify(['Order #1001 (shop)', 'Viewed article: Reset your password'])) {
      fail(`unexpected timeline (newest first expected): ${JSON.stringify(s)}`);
    }
    const time = (await ev('article_viewed').locator('[data-testid=event-time]').textContent()).trim();
    if (!/^\d+ minutes ago · \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/.test(time)) fail(`event time not relative + absolute: ${JSON.stringify(time)}`);
    const profile = card.locator('[data-testid=profile-card][data-source="shop"][data-type="customer"]');
    await profile.waitFor({ timeout: WAIT_MS });
    if ((await profile.locator('[data-testid=profile-name]').textContent()) !== 'Jane') fail('profile name is not Jane');
    const ids = await profile.locator('[data-testid=profile-identifiers] li').allTextContents();
    if (!ids.some((t) => t.includes('jane@example.com')) || !ids.some((t) => t.includes('C-77'))) fail(`identifiers: ${JSON.stringify(ids)}`);
    // 13 attribute fields (address flattened to address.city / address.zip): 10 shown.
    if (await profile.locator('[data-testid=profile-field]').count() !== 10) fail('not exactly 10 fields shown before "View all"');
    const more = profile.locator('[data-testid=view-all-fields]');
    if ((await more.textContent()).trim() !== 'View all (13)') fail(`view-all button says ${JSON.stringify(await more.textContent())}`);
    await more.click();
    await until('13 fields after "View all"', async () => (await profile.locator('[data-testid=profile-field]').count()) === 13);
    const city = profile.locator('[data-testid=profile-field][data-key="address.city"] dd');
    if ((await city.textContent()) !== 'Berlin') fail('nested attribute address.city not flattened');
  });

  await step('unticking a type hides it from the open card', async () => {
    const v0 = await card.locator('[data-testid=customer-version]').textContent();
    // The agent's card stays open in its (now background) tab.
    await admin.bringToFront();
    await admin.click('#nav-events');
    await admin.click('#tab-zendesk-events');
    const box = admin.locator('[data-testid=event-type-row][data-source="zendesk"][data-type="article_viewed"] input[type=checkbox]');
    await box.waitFor({ timeout: WAIT_MS });
    if (!(await box.isChecked())) fail('article_viewed is not ticked after reload of the Events screen');
    await box.uncheck();
    await saveAndWait(admin, '#save-events', 'events-status');
    await ev('article_viewed').waitFor({ state: 'detached', timeout: WAIT_MS });
    if (await ev('order_completed').count() !== 1) fail('order_completed vanished too');
    const v1 = await card.locator('[data-testid=customer-version]').textContent();
    if (Number(v1) <= Number(v0)) fail(`version did not increase (${v0} -> ${v1})`);
    // Settings from the Events screen kept the profile part.
    const vis = (await http('GET', '/api/admin/visibility', undefined, 200)).json;
    if (!vis.profiles_api || vis.shown_profile_types.length !== 1) fail(`profile settings lost by the events save: ${JSON.stringify(vis)}`);
  });

  await step('ticking it again brings the history back', async () => {
    await admin.bringToFront();
    const box = admin.locator('[data-testid=event-type-row][data-source="zendesk"][data-type="article_viewed"] input[type=checkbox]');
    await box.check();
    await saveAndWait(admin, '#save-events', 'events-status');
    await ev('article_viewed').waitFor({ timeout: WAIT_MS });
  });

  await step('a new event appears live, filters kept, data escaped', async () => {
    await card.bringToFront();
    await card.evaluate(() => { window.__noReload = 'still here'; });
    await card.selectOption('#filter-source', 'shop');
    await until('the source filter to apply', async () => (await ev('article_viewed').count()) === 0);
    const evil = 'Order #1002 <img src=x onerror="window.__xss=1">';
    await http('POST', '/api/v2/users/12345/events', {
      profile: { source: 'shop', type: 'customer' },
      event: { id: 'order-1002', source: 'shop', type: 'order_completed', description: evil, created_at: iso(0), properties: { order: { id: '1002' } } },
    }, 202);
    await ev('order_completed', '[data-id="order-1002"]').waitFor({ timeout: WAIT_MS });
    await card.locator('#customer-updated').waitFor({ state: 'visible', timeout: 5000 });
    if ((await card.locator('#customer-updated').textContent()).trim() !== 'Updated just now') fail('no "Updated just now"');
    if (await card.evaluate(() => window.__noReload) !== 'still here') fail('the page was reloaded');
    if (await card.inputValue('#filter-source') !== 'shop') fail('source filter was reset by the update');
    if (await ev('article_viewed').count() !== 0) fail('source filter no longer applied after the update');
    const s = await summaries();
    if (s[0] !== `${evil} (shop)`) fail(`newest event summary: ${JSON.stringify(s[0])}`);
    if (await card.evaluate(() => window.__xss) !== undefined) fail('event data was interpreted as HTML');
    if (await card.locator('#timeline img').count() !== 0) fail('an <img> from event data was rendered');
    // Type filter, then back to everything.
    await card.selectOption('#filter-source', '');
    await card.selectOption('#filter-type', 'article_viewed');
    await until('the type filter to apply', async () => (await ev('order_completed').count()) === 0 && (await ev('article_viewed').count()) === 1);
    await card.selectOption('#filter-type', '');
    await until('all events back', async () => (await card.locator('#timeline [data-testid=event]').count()) === 3);
  });

  await step('look customers up by identifier', async () => {
    await card.fill('#customer-search', 'email:jane@example.com');
    await card.click('#customer-search-submit');
    await until('#/customer/12345 from email:jane@example.com', async () => card.url().endsWith('#/customer/12345'));
    await card.locator('#customer-title').filter({ hasText: 'Jane' }).waitFor({ timeout: WAIT_MS });
    await card.screenshot({ path: path.join(SHOTS, 'customer.png'), fullPage: true });

    // A user created from an identifier has a user id that looks like one.
    await card.fill('#customer-search', 'email:solo@example.com');
    await card.press('#customer-search', 'Enter');
    await until('#/customer/email%3Asolo%40example.com', async () => card.url().endsWith('#/customer/email%3Asolo%40example.com'));
    await ev('order_completed').filter({ hasText: 'Order #2001 (shop)' }).waitFor({ timeout: WAIT_MS });
    if ((await card.locator('[data-testid=customer-user-id]').textContent()) !== 'email:solo@example.com') fail('solo user id not shown');

    await card.fill('#customer-search', 'external_id:C-77');
    await card.press('#customer-search', 'Enter');
    await until('#/customer/12345 from external_id:C-77', async () => card.url().endsWith('#/customer/12345'));
    await ev('article_viewed').waitFor({ timeout: WAIT_MS });

    await card.fill('#customer-search', 'email:nobody@example.com');
    await card.press('#customer-search', 'Enter');
    await until('"No such customer"', async () => /No such customer/.test(await card.locator('#customer-status').textContent()));
    if (await card.isVisible('#customer-card')) fail('card still shown for an unknown customer');
  });

  await step('a 401 asks for a token and sends it as a Bearer token', async () => {
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(`token page: ${e.message}`));
    const seen = [];
    await page.route(BASE + '/api/**', (route) => {
      const auth = route.request().headers()['authorization'] || '';
      seen.push(auth);
      if (auth !== 'Bearer s3cret') return route.fulfill({ status: 401, contentType: 'application/json', body: '{"errors":[{"code":"unauthorized","title":"token required"}]}' });
      return route.continue();
    });
    await page.goto(BASE + '/#/events');
    await page.locator('#token-prompt').waitFor({ state: 'visible', timeout: WAIT_MS });
    await page.fill('#token-input', 's3cret');
    await page.press('#token-input', 'Enter');
    await page.locator('[data-testid=event-type-row][data-type="article_viewed"]').waitFor({ timeout: WAIT_MS });
    if (!(await page.isHidden('#token-prompt'))) fail('token prompt still visible');
    if (await page.evaluate(() => sessionStorage.getItem('contextd.api_token')) !== 's3cret') fail('token not kept in sessionStorage');
    if (!seen.includes('Bearer s3cret')) fail('token not sent');
    await page.close();
  });

  await step('no script errors, no foreign requests', async () => {
    if (pageErrors.length) fail(`page errors: ${pageErrors.join('; ')}`);
    if (foreign.length) fail(`requests outside contextd: ${foreign.join(', ')}`);
  });
}

async function cleanup() {
  if (browser) await browser.close().catch(() => {});
  if (child && child.exitCode === null && child.signalCode === null) {
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const t = setTimeout(killChild, 5000);
    await gone;
    clearTimeout(t);
  }
  if (dataDir && !process.env.KEEP_DATA) fs.rmSync(dataDir, { recursive: true, force: true });
}

const overall = setTimeout(() => {
  log(`FAIL: the test took longer than ${TOTAL_MS / 1000} s (step: ${currentStep})`);
  killChild();
  process.exit(1);
}, TOTAL_MS);

log(`contextd console browser test (${BIN})`);
let code = 0;
try {
  await main();
  log(`PASS: console browser test (screenshots in ${SHOTS})`);
} catch (e) {
  code = 1;
  log(`FAIL at step "${currentStep}": ${e && e.message ? e.message : e}`);
  if (childLog) log(`--- last contextd output ---\n${childLog.split('\n').slice(-40).join('\n')}`);
} finally {
  await cleanup();
  clearTimeout(overall);
}
process.exit(code);
