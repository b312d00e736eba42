// Drives Debian's Chromium through the softphone page with a WAV file as the microphone.
//
//   node tests/browser/drive.mjs '<scenario JSON>'
//
// Prints one line `RESULT <json>` with what the page showed (transcript entries, latency rows,
// status, error box, audio statistics, WebRTC stats) and exits 0; on a timeout it still prints the
// page's state, with "failure" set, and exits 1. Called by tests/gateway/test_softphone.py.
//
// Scenario: {url, chromium, wav, transport: "websocket"|"webrtc", codec: "pcm16"|"pcmu", persona, number,
//            token, denyMic, expectError, waitForText: [..], minAudibleMs (after the texts showed),
//            minSamplesReceived, screenshot, interrupt, hangup, timeoutMs}
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const scenario = JSON.parse(process.argv[2] || "{}");
const timeout = scenario.timeoutMs ?? 30000;
const started = Date.now();
const log = (...args) => console.error(`[drive +${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);

const args = [
  "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection",
  "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns",
];
if (scenario.wav) args.push(`--use-file-for-fake-audio-capture=${scenario.wav}`);
// without the fake UI flag Chromium asks, and Playwright answers "deny" for permissions not granted
if (!scenario.denyMic) args.push("--use-fake-ui-for-media-stream");

const profile = mkdtempSync(join(tmpdir(), "voxray-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: scenario.chromium || "/usr/bin/chromium",
  headless: true,
  args,
  ignoreDefaultArgs: ["--mute-audio"],
  viewport: { width: 1180, height: 720 },
  permissions: scenario.denyMic ? [] : ["microphone"],
});
const page = context.pages()[0] || (await context.newPage());
const consoleLines = [];
page.on("console", (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.message}`));

async function snapshot() {
  return page.evaluate(async () => {
    const sp = window.__softphone || {};
    const entries = [...document.querySelectorAll('[data-testid="transcript-entry"]')].map((li) => ({
      id: li.id, role: li.dataset.role, final: li.dataset.final === "true",
      text: li.querySelector(".text")?.textContent || "", interrupted: li.dataset.interrupted === "true",
    }));
    const latency = [...document.querySelectorAll('[data-testid="latency-row"]')].map((tr) => ({
      id: tr.id, turn: Number(tr.dataset.turn),
      ...Object.fromEntries([...tr.querySelectorAll("td[data-field]")].map((td) => [td.dataset.field, td.textContent])),
    }));
    const status = document.querySelector('[data-testid="status"]');
    const error = document.querySelector('[data-testid="error"]');
    return {
      entries, latency,
      status: { text: status.textContent, state: status.dataset.state },
      error: { visible: !error.hidden, text: error.textContent, code: error.dataset.code || "" },
      meta: document.querySelector('[data-testid="call-meta"]').textContent,
      personaOptions: [...document.querySelectorAll("#persona-options option")].map((o) => o.value),
      phase: sp.phase, transport: sp.transport, codec: sp.codec, sessionId: sp.sessionId,
      events: (sp.events || []).map((e) => ({ ...e })), stats: sp.stats,
      rtc: sp.rtcStats ? await sp.rtcStats() : null,
    };
  });
}

const result = { failure: null };
try {
  await page.goto(scenario.url, { waitUntil: "load" });
  await page.waitForFunction(() => !!window.__softphone, null, { timeout: 5000 });
  if (scenario.token) await page.fill("#token", scenario.token);   // the <details> need not be open
  await page.check(`#transport-${scenario.transport || "websocket"}`);
  await page.setChecked("#codec", scenario.codec === "pcmu");
  if (scenario.persona) await page.fill("#persona", scenario.persona);
  if (scenario.number) await page.fill("#number", scenario.number);
  log("calling", scenario.transport, scenario.codec);
  await page.click("#call");

  if (scenario.denyMic || scenario.expectError) {
    await page.waitForSelector('[data-testid="error"]:not([hidden])', { timeout });
    await page.waitForSelector('[data-testid="status"][data-state="error"], [data-testid="status"][data-state="ended"]',
      { timeout: 5000 });
  } else {
    const texts = scenario.waitForText || [];
    await page.waitForFunction((texts) => [...texts].every((t) => [...document.querySelectorAll(
      '[data-testid="transcript-entry"][data-final="true"] .text')].some((el) => el.textContent.includes(t))),
    texts, { timeout, polling: 100 });
    log("transcripts shown");
    // audio heard since the last awaited text appeared (the reply, not the greeting)
    const base = await page.evaluate(() => window.__softphone.stats.playback.audibleMs);
    result.audibleMsAtText = base;
    await page.waitForFunction((ms) => window.__softphone.stats.playback.audibleMs >= ms, base + (scenario.minAudibleMs ?? 0),
      { timeout: Math.max(1000, timeout - (Date.now() - started)), polling: 100 });
    if (scenario.minSamplesReceived) {
      const deadline = Date.now() + 10000;
      for (;;) {
        const rtc = await page.evaluate(() => window.__softphone.rtcStats());
        if ((rtc?.inbound?.totalSamplesReceived || 0) >= scenario.minSamplesReceived) break;
        if (Date.now() > deadline) throw new Error(`inbound samples stayed below ${scenario.minSamplesReceived}`);
        await page.waitForTimeout(200);
      }
    }
    log("reply audio played");
    if (scenario.screenshot) {
      await page.screenshot({ path: scenario.screenshot, fullPage: true });
      log("screenshot", scenario.screenshot);
    }
  }
  result.page = await snapshot();
  if (scenario.interrupt) {
    const flushes = result.page.stats.playback.flushes;
    await page.click("#interrupt");
    await page.waitForFunction((n) => window.__softphone.stats.playback.flushes > n
      && document.querySelector('[data-testid="transcript-entry"][data-interrupted="true"]'), flushes, { timeout: 5000 });
    const at = await page.evaluate(() => window.__softphone.stats.playback.audibleMs);
    await page.waitForTimeout(600);
    result.afterInterrupt = await snapshot();
    result.afterInterrupt.audibleMsAtFlush = at;
    log("interrupted");
  }
  if (scenario.hangup) {
    await page.click("#hangup");
    await page.waitForSelector('[data-testid="status"][data-state="ended"]', { timeout: 5000 });
    result.afterHangup = await snapshot();
  }
} catch (err) {
  result.failure = String(err && err.message ? err.message : err);
  try { result.page = await snapshot(); } catch (e) { result.snapshotFailure = String(e); }
} finally {
  result.console = consoleLines.slice(-50);
  result.elapsedMs = Date.now() - started;
  await context.close().catch(() => {});
  rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(`RESULT ${JSON.stringify(result)}\n`);
process.exit(result.failure ? 1 : 0);
