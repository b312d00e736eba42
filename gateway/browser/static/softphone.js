/* Voxray softphone: talk to the agent from the browser over /ws or WebRTC (design §3, §3.1, §7).
 *
 * WebSocket: the microphone is captured by an AudioWorklet (ScriptProcessor where there is none),
 * cut into 20 ms frames of 16 kHz 16-bit PCM (8 kHz µ-law with the phone codec) and sent as binary
 * messages; the agent's audio comes back the same way at the rate `ready` announces and is scheduled
 * gap-free on an AudioContext; `interrupted` flushes what is queued. JSON text messages carry
 * control (`start`, `interrupt`, `end`) and events (`ready`, `transcript`, `bot_speaking`,
 * `turn_latency`, `interrupted`, `error`, `end`).
 *
 * WebRTC: the page creates a data channel named "events" before its offer, posts the offer to
 * POST /webrtc/offer and plays the answer's audio track in an <audio autoplay>; the same events
 * arrive on the data channel, which takes {"type": "interrupt"} and {"type": "end"}. The phone codec
 * asks for PCMU first (RTCRtpTransceiver.setCodecPreferences).
 *
 * For tests and the curious, window.__softphone holds the state, every event, audio statistics and
 * rtcStats() (the inbound audio numbers of getStats()).
 */
"use strict";

(() => {
  const FRAME_MS = 20;
  const PCM_RATE = 16000;
  const PHONE_RATE = 8000;
  const AUDIBLE = 0.01;                // |sample| or RMS above this (-40 dBFS) counts as sound
  const LEAD_S = 0.08;                 // playback starts this far ahead, so jitter does not cut it
  const TOKEN_SAFE = /^[A-Za-z0-9._~+-]+$/;   // fits a WebSocket subprotocol; others go as ?token=

  const $ = (id) => document.getElementById(id);
  const pageConfig = (() => {
    try { return JSON.parse($("voxray-config").textContent || "{}"); } catch { return {}; }
  })();

  // ---------------------------------------------------------------------------------- state (tests read it)
  const stats = {
    capture: { frames: 0, bytes: 0, maxRms: 0 },
    received: { messages: 0, bytes: 0 },
    playback: { samples: 0, audibleSamples: 0, chunks: 0, gaps: 0, flushes: 0, maxRms: 0, audibleMs: 0, rate: 0 },
  };
  const state = { phase: "idle", transport: null, codec: "pcm16", sessionId: null, events: [], stats, call: null };
  window.__softphone = state;
  state.rtcStats = async () => (state.call && state.call.rtcStats ? state.call.rtcStats() : null);

  // ---------------------------------------------------------------------------------- G.711 µ-law
  const ULAW_TO_FLOAT = new Float32Array(256);
  for (let i = 0; i < 256; i++) {
    const u = ~i & 0xff;
    const magnitude = ((((u & 0x0f) << 3) + 0x84) << ((u >> 4) & 7)) - 0x84;
    ULAW_TO_FLOAT[i] = ((u & 0x80) ? -magnitude : magnitude) / 32768;
  }

  function ulawEncode(pcm) {          // Int16Array -> Uint8Array (G.711, as carriers send it)
    const out = new Uint8Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) {
      let s = pcm[i];
      const sign = s < 0 ? 0x80 : 0;
      if (sign) s = -s;
      if (s > 32635) s = 32635;
      s += 0x84;
      let exponent = 7;
      for (let mask = 0x4000; (s & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
      out[i] = ~(sign | (exponent << 4) | ((s >> (exponent + 3)) & 0x0f)) & 0xff;
    }
    return out;
  }

  function decode(buffer, codec) {    // a binary message -> Float32 samples
    if (codec === "pcmu") {
      const bytes = new Uint8Array(buffer);
      const out = new Float32Array(bytes.length);
      for (let i = 0; i < bytes.length; i++) out[i] = ULAW_TO_FLOAT[bytes[i]];
      return out;
    }
    const pcm = new Int16Array(buffer, 0, buffer.byteLength >> 1);
    const out = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) out[i] = pcm[i] / 32768;
    return out;
  }

  function rmsOf(samples) {
    let energy = 0;
    for (let i = 0; i < samples.length; i++) energy += samples[i] * samples[i];
    return samples.length ? Math.sqrt(energy / samples.length) : 0;
  }

  // ---------------------------------------------------------------------------------- the page
  const ui = {
    form: $("call-form"), call: $("call"), hangup: $("hangup"), interrupt: $("interrupt"),
    status: $("status"), error: $("error"), transcript: $("transcript"), latency: $("latency-rows"),
    meta: $("call-meta"), micLevel: $("mic-level"), agentLevel: $("agent-level"), audio: $("remote-audio"),
    persona: $("persona"), number: $("number"), codec: $("codec"), token: $("token"),
    instructions: $("instructions"), personaOptions: $("persona-options"), personaHelp: $("persona-help"),
  };
  let entryCount = 0;
  let turnCount = 0;
  const openEntries = { user: null, assistant: null };   // interim entries a final one completes

  function setStatus(text, phase) {
    ui.status.textContent = text;
    if (phase) {
      state.phase = phase;
      ui.status.dataset.state = phase;
    }
  }

  function showError(message, code) {
    ui.error.textContent = message;
    ui.error.dataset.code = code || "";
    ui.error.hidden = false;
    ui.error.scrollIntoView({ block: "nearest" });
  }

  function clearError() {
    ui.error.textContent = "";
    ui.error.dataset.code = "";
    ui.error.hidden = true;
  }

  function addTranscript(role, text, final) {
    const who = role === "user" ? "user" : "assistant";
    $("transcript-empty")?.remove();
    let entry = openEntries[who];
    if (!entry) {
      entry = document.createElement("li");
      entry.id = `transcript-${++entryCount}`;
      entry.className = `entry ${who}`;
      entry.dataset.testid = "transcript-entry";
      entry.dataset.role = who;
      const label = document.createElement("span");
      label.className = "who";
      label.textContent = who === "user" ? "You" : "Agent";
      const body = document.createElement("p");
      body.className = "text";
      entry.append(label, body);
      ui.transcript.append(entry);
    }
    entry.querySelector(".text").textContent = text;
    entry.dataset.final = final ? "true" : "false";
    entry.setAttribute("aria-label", `${who === "user" ? "You" : "Agent"}${final ? "" : " (still speaking)"}: ${text}`);
    openEntries[who] = final ? null : entry;
    entry.scrollIntoView({ block: "nearest" });
  }

  function markInterrupted(heard) {
    const entries = ui.transcript.querySelectorAll('[data-role="assistant"]');
    const last = entries[entries.length - 1];
    if (!last) return;
    last.dataset.interrupted = "true";
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = heard ? `Interrupted. You heard: “${heard}”` : "Interrupted.";
    last.append(note);
  }

  const LATENCY_FIELDS = ["first_audio_out_ms", "turn_wait_ms", "stt_ms", "llm_first_token_ms", "tts_first_audio_ms"];

  function addLatency(event) {
    const row = document.createElement("tr");
    row.dataset.testid = "latency-row";
    row.dataset.turn = String(++turnCount);
    row.id = `latency-${turnCount}`;
    const head = document.createElement("th");
    head.scope = "row";
    head.textContent = String(turnCount);
    row.append(head);
    for (const field of LATENCY_FIELDS) {
      const cell = document.createElement("td");
      cell.dataset.field = field;
      const value = event[field];
      cell.textContent = typeof value === "number" ? String(Math.round(value)) : "–";
      row.append(cell);
    }
    ui.latency.append(row);
  }

  function setInCall(inCall) {
    for (const el of ui.form.querySelectorAll("input, textarea")) el.disabled = inCall || el.dataset.unavailable === "true";
    ui.call.disabled = inCall;
    ui.hangup.disabled = !inCall;
    ui.interrupt.disabled = !inCall;
  }

  function authHeaders() {
    const token = ui.token.value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  // ---------------------------------------------------------------------------------- microphone
  class MicError extends Error {}

  function micMessage(err) {
    switch (err && err.name) {
      case "NotAllowedError":
      case "PermissionDeniedError":
      case "SecurityError":
        return "Microphone access was blocked — allow it in the address bar and try again.";
      case "NotFoundError":
      case "DevicesNotFoundError":
      case "OverconstrainedError":
        return "No microphone was found — connect one (or pick one in your system settings) and try again.";
      case "NotReadableError":
      case "TrackStartError":
      case "AbortError":
        return "The microphone could not be started — another app may be using it. Close it and try again.";
      default:
        return `The microphone could not be started (${(err && (err.message || err.name)) || "unknown error"}).`;
    }
  }

  async function openMicrophone() {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new MicError("The microphone only works on a secure page — open this page over https:// or at http://localhost.");
    }
    try {
      return await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      });
    } catch (err) {
      throw new MicError(micMessage(err));
    }
  }

  function newAudioContext(rate) {
    try {
      return rate ? new AudioContext({ sampleRate: rate, latencyHint: "interactive" }) : new AudioContext();
    } catch {
      return new AudioContext();   // a browser that cannot run at the wire rate: the worklet resamples
    }
  }

  /* Feeds 20 ms Int16 frames at outputRate to onFrame(frame, rms). */
  async function startCapture(ctx, source, outputRate, onFrame) {
    const sink = ctx.createGain();      // keeps the capture node pulled by the graph, silently
    sink.gain.value = 0;
    sink.connect(ctx.destination);
    if (ctx.audioWorklet && typeof AudioWorkletNode !== "undefined") {
      try {
        await ctx.audioWorklet.addModule("/static/capture-worklet.js");
        const node = new AudioWorkletNode(ctx, "voxray-capture", {
          numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], channelCount: 1,
          channelCountMode: "explicit", channelInterpretation: "speakers",
          processorOptions: { outputRate, frameMs: FRAME_MS },
        });
        node.port.onmessage = (e) => onFrame(e.data.frame, e.data.rms);
        source.connect(node);
        node.connect(sink);
        return node;
      } catch (err) {
        console.warn("AudioWorklet unavailable; capturing with ScriptProcessor", err);
      }
    }
    const framer = new Framer(ctx.sampleRate, outputRate, FRAME_MS);   // from capture-worklet.js
    const node = ctx.createScriptProcessor(1024, 1, 1);
    node.onaudioprocess = (e) => framer.push(e.inputBuffer.getChannelData(0), onFrame);
    source.connect(node);
    node.connect(sink);
    return node;
  }

  // ---------------------------------------------------------------------------------- levels and playback
  /* Measures what actually plays (not just what arrived): an analyser on the output. */
  class LevelWatch {
    constructor(analyser, meter) {
      this.analyser = analyser;
      this.meter = meter;
      this.buffer = new Float32Array(analyser.fftSize);
      this.timer = setInterval(() => this.tick(), 50);
    }

    tick() {
      this.analyser.getFloatTimeDomainData(this.buffer);
      const level = rmsOf(this.buffer);
      this.meter.value = Math.min(1, level * 3);
      stats.playback.maxRms = Math.max(stats.playback.maxRms, level);
      if (level > AUDIBLE) stats.playback.audibleMs += 50;
    }

    stop() {
      clearInterval(this.timer);
      this.meter.value = 0;
    }
  }

  /* Gap-free playback: each chunk starts where the previous one ends (plus a small lead after a pause). */
  class Player {
    constructor(ctx) {
      this.ctx = ctx;
      this.output = ctx.createGain();
      this.analyser = ctx.createAnalyser();
      this.analyser.fftSize = 1024;
      this.output.connect(ctx.destination);
      this.output.connect(this.analyser);
      this.watch = new LevelWatch(this.analyser, ui.agentLevel);
      this.sources = new Set();
      this.nextTime = 0;
    }

    play(samples, rate) {
      if (!samples.length) return;
      const p = stats.playback;
      p.chunks += 1;
      p.samples += samples.length;
      p.rate = rate;
      for (let i = 0; i < samples.length; i++) if (Math.abs(samples[i]) > AUDIBLE) p.audibleSamples += 1;
      const buffer = this.ctx.createBuffer(1, samples.length, rate);
      buffer.copyToChannel(samples, 0);
      const source = this.ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(this.output);
      const now = this.ctx.currentTime;
      if (this.nextTime < now + 0.005) {
        if (this.sources.size) p.gaps += 1;          // ran dry in the middle of speech
        this.nextTime = now + LEAD_S;
      }
      source.start(this.nextTime);
      this.nextTime += buffer.duration;
      this.sources.add(source);
      source.onended = () => this.sources.delete(source);
    }

    flush() {
      for (const source of this.sources) {
        try { source.stop(); } catch { /* already stopped */ }
      }
      this.sources.clear();
      this.nextTime = 0;
      stats.playback.flushes += 1;
    }

    close() {
      this.flush();
      this.watch.stop();
    }
  }

  // ---------------------------------------------------------------------------------- events (both transports)
  function describeClose(code, reason) {
    if (reason === "missing or wrong API key") return "The gateway refused the API key — check the API key field.";
    if (reason === "origin not allowed") return "The gateway does not accept calls from this page's address (cors_allowed_origins).";
    if (reason === "too many bad messages") return "The gateway ended the call: too many messages it could not read.";
    if (code === 1006) return "The connection to the gateway was lost.";
    return `The gateway closed the connection (${code}${reason ? `: ${reason}` : ""}).`;
  }

  function onEvent(call, message) {
    state.events.push(message);
    switch (message.type) {
      case "ready":
        state.sessionId = message.session_id || state.sessionId;
        setStatus("Connected — talk now", "live");
        break;
      case "transcript":
        addTranscript(message.role, message.text || "", message.final !== false);
        break;
      case "bot_speaking":
        if (state.phase === "live" || state.phase === "speaking") {
          setStatus(message.state === "started" ? "Agent speaking" : "Listening", message.state === "started" ? "speaking" : "live");
        }
        break;
      case "turn_latency":
        addLatency(message);
        break;
      case "interrupted":
        call.flush();
        markInterrupted(message.heard);
        break;
      case "error":
        call.errorShown = true;
        showError(message.message || message.code || "The gateway reported an error.", message.code);
        break;
      case "end":
        call.endedByServer = message.reason || "ended";
        break;
      default:
        break;
    }
  }

  function parseEvent(text) {
    try {
      const message = JSON.parse(text);
      return message && typeof message === "object" ? message : null;
    } catch {
      return null;
    }
  }

  // ---------------------------------------------------------------------------------- WebSocket call
  class WsCall {
    constructor(options) {
      this.options = options;
      this.codec = options.phoneCodec ? "pcmu" : "pcm16";
      this.wireRate = options.phoneCodec ? PHONE_RATE : PCM_RATE;
      this.ctx = newAudioContext(this.wireRate);   // created in the click: allowed to play
      this.outputRate = PCM_RATE;
      this.live = false;
      this.hangingUp = false;
      this.endedByServer = null;
      this.closed = new Promise((resolve) => { this.resolveClosed = resolve; });
    }

    async start() {
      this.stream = await openMicrophone();
      if (this.hangingUp) return this.release();     // hung up while the browser asked for the microphone
      await this.ctx.resume();
      let source;
      try {
        source = this.ctx.createMediaStreamSource(this.stream);
      } catch {                       // some browsers cannot mix a microphone into a context at another rate
        await this.ctx.close();
        this.ctx = newAudioContext(0);
        await this.ctx.resume();
        source = this.ctx.createMediaStreamSource(this.stream);
      }
      this.player = new Player(this.ctx);
      this.capture = await startCapture(this.ctx, source, this.wireRate, (frame, rms) => this.send(frame, rms));
      this.open();
    }

    open() {
      const url = new URL("/ws", window.location.href);
      url.protocol = window.location.protocol === "https:" ? "wss:" : "ws:";
      const protocols = ["voxray"];
      const token = this.options.token;
      if (token && TOKEN_SAFE.test(token)) protocols.push(`bearer.${token}`);
      else if (token) url.searchParams.set("token", token);
      const ws = new WebSocket(url, protocols);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onopen = () => {
        const start = { type: "start", codec: this.codec, sample_rate: this.wireRate };
        if (this.options.persona) start.persona = this.options.persona;
        if (this.options.number) start.number = this.options.number;
        if (this.options.context) start.context = this.options.context;
        ws.send(JSON.stringify(start));
        setStatus("Connecting…", "connecting");
      };
      ws.onmessage = (e) => {
        if (typeof e.data === "string") {
          const message = parseEvent(e.data);
          if (!message) return;
          if (message.type === "ready" && !this.ready(message)) return;
          onEvent(this, message);
        } else if (this.live) {
          stats.received.messages += 1;
          stats.received.bytes += e.data.byteLength;
          this.player.play(decode(e.data, this.codec), this.outputRate);
        }
      };
      ws.onclose = (e) => {
        this.live = false;
        this.resolveClosed();
        this.release();
        // an error event sent before the close says more than the close reason does
        if (!this.hangingUp && !this.endedByServer && !this.errorShown && e.code !== 1000) {
          showError(describeClose(e.code, e.reason));
        }
        finishCall(this, this.endedByServer || (this.hangingUp ? "hung up" : this.wasReady ? `closed (${e.code})` : "failed"));
      };
    }

    ready(message) {
      if ((message.codec || "pcm16") !== this.codec) {
        showError("This gateway does not offer the phone codec over WebSocket; turn it off and call again.");
        this.errorShown = true;
        this.hangup();
        return false;
      }
      this.outputRate = message.sample_rate || (this.codec === "pcmu" ? PHONE_RATE : PCM_RATE);
      this.live = true;
      this.wasReady = true;
      ui.meta.textContent = `WebSocket · ${this.codec === "pcmu" ? "G.711 µ-law 8 kHz" : "PCM 16 kHz"} · session ${message.session_id || "?"}`;
      return true;
    }

    send(frame, rms) {
      ui.micLevel.value = Math.min(1, rms * 3);
      stats.capture.maxRms = Math.max(stats.capture.maxRms, rms);
      if (!this.live || this.ws.readyState !== WebSocket.OPEN) return;
      const data = this.codec === "pcmu" ? ulawEncode(frame) : frame;
      this.ws.send(data.buffer);
      stats.capture.frames += 1;
      stats.capture.bytes += data.byteLength;
    }

    control(type) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify({ type }));
    }

    flush() {
      this.player?.flush();
    }

    async hangup() {
      if (this.hangingUp) return;
      this.hangingUp = true;
      this.live = false;
      this.control("end");
      const timeout = new Promise((resolve) => setTimeout(resolve, 1500));
      if (this.ws && this.ws.readyState <= WebSocket.OPEN) await Promise.race([this.closed, timeout]);
      if (this.ws && this.ws.readyState !== WebSocket.CLOSED) this.ws.close(1000, "hung up");
      this.release();
      finishCall(this, this.endedByServer || "hung up");
    }

    release() {
      if (this.released) return;
      this.released = true;
      this.live = false;
      this.capture?.disconnect();
      this.player?.close();
      this.stream?.getTracks().forEach((t) => t.stop());
      if (this.ctx.state !== "closed") this.ctx.close();
      ui.micLevel.value = 0;
    }
  }

  // ---------------------------------------------------------------------------------- WebRTC call
  function preferPcmu(transceiver) {
    if (!transceiver.setCodecPreferences || !window.RTCRtpReceiver?.getCapabilities) return false;
    const codecs = RTCRtpReceiver.getCapabilities("audio")?.codecs || [];
    const pcmu = codecs.filter((c) => c.mimeType.toLowerCase() === "audio/pcmu");
    if (!pcmu.length) return false;
    const others = codecs.filter((c) => c.mimeType.toLowerCase() !== "audio/pcmu");
    try {
      transceiver.setCodecPreferences([...pcmu, ...others]);
      return true;
    } catch {
      return false;
    }
  }

  function gatheringComplete(pc, timeoutMs) {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, timeoutMs);     // offer what we have: host candidates come first
    });
  }

  async function offerError(response) {
    let detail = "";
    try {
      const body = await response.json();
      detail = body.error || body.message || "";
      if (detail && typeof detail === "object") detail = detail.message || JSON.stringify(detail);
    } catch { /* not JSON */ }
    if (response.status === 401) return "The gateway refused the API key — check the API key field.";
    if (response.status === 404 || response.status === 405) return "This gateway does not offer WebRTC (see its transport setting); use WebSocket.";
    return `The gateway could not start the WebRTC call (${response.status}${detail ? `: ${detail}` : ""}).`;
  }

  class RtcCall {
    constructor(options) {
      this.options = options;
      this.ctx = newAudioContext(0);      // only for the level meters
      this.hangingUp = false;
      this.endedByServer = null;
      this.watches = [];
    }

    async start() {
      this.stream = await openMicrophone();
      if (this.hangingUp) return this.release();
      await this.ctx.resume();
      const pc = new RTCPeerConnection({ iceServers: pageConfig.iceServers || [] });
      this.pc = pc;
      const [track] = this.stream.getAudioTracks();
      const transceiver = pc.addTransceiver(track, { direction: "sendrecv", streams: [this.stream] });
      // phone codec: PCMU first in our offer (where the browser allows it), and "codec": "pcmu" in the request
      this.pcmuPreferred = this.options.phoneCodec ? preferPcmu(transceiver) : false;
      // the events channel exists before the offer, so it is part of the negotiation
      const channel = pc.createDataChannel("events");
      this.channel = channel;
      channel.onmessage = (e) => {
        const message = typeof e.data === "string" ? parseEvent(e.data) : null;
        if (message) onEvent(this, message);
        if (message?.type === "end") this.hangup();
      };
      channel.onopen = () => setStatus("Connected — talk now", "live");
      pc.ontrack = (e) => this.remote(e.streams[0] || new MediaStream([e.track]));
      pc.onconnectionstatechange = () => {
        if (pc.connectionState === "failed") {
          showError("The call's audio connection failed. Behind a strict firewall the gateway needs a TURN server (webrtc_ice_servers).");
          this.hangup();
        } else if (pc.connectionState === "disconnected" && !this.hangingUp) {
          setStatus("Connection interrupted — reconnecting…", "connecting");
        }
      };
      this.watchLocal();

      await pc.setLocalDescription(await pc.createOffer());
      await gatheringComplete(pc, 2500);
      setStatus("Connecting…", "connecting");
      const body = { sdp: pc.localDescription.sdp, type: "offer" };
      if (this.options.phoneCodec) body.codec = "pcmu";     // and the gateway answers with PCMU
      if (this.options.persona) body.persona = this.options.persona;
      if (this.options.number) body.number = this.options.number;
      if (this.options.context) body.context = this.options.context;
      let response;
      try {
        response = await fetch("/webrtc/offer", {
          method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: JSON.stringify(body),
        });
      } catch {
        throw new Error("Could not reach the gateway to start the WebRTC call.");
      }
      if (!response.ok) throw new Error(await offerError(response));
      const answer = await response.json();
      state.sessionId = answer.session_id || null;
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      this.showCodec();
    }

    remote(stream) {
      ui.audio.srcObject = stream;
      ui.audio.play?.().catch(() => { /* autoplay: the Call click usually allows it */ });
      const analyser = this.ctx.createAnalyser();
      analyser.fftSize = 1024;
      this.ctx.createMediaStreamSource(stream).connect(analyser);
      this.watches.push(new LevelWatch(analyser, ui.agentLevel));
    }

    watchLocal() {
      const analyser = this.ctx.createAnalyser();
      analyser.fftSize = 1024;
      this.ctx.createMediaStreamSource(this.stream).connect(analyser);
      const buffer = new Float32Array(analyser.fftSize);
      this.micTimer = setInterval(() => {
        analyser.getFloatTimeDomainData(buffer);
        const level = rmsOf(buffer);
        ui.micLevel.value = Math.min(1, level * 3);
        stats.capture.maxRms = Math.max(stats.capture.maxRms, level);
      }, 50);
    }

    async showCodec() {
      for (let i = 0; i < 20 && !this.hangingUp; i++) {
        const s = await this.rtcStats();
        if (s && s.codec) {
          ui.meta.textContent = `WebRTC · ${s.codec} · session ${state.sessionId || "?"}`;
          return;
        }
        await new Promise((resolve) => setTimeout(resolve, 250));
      }
    }

    async rtcStats() {
      if (!this.pc) return null;
      const report = await this.pc.getStats();
      const out = { codec: null, inbound: null, outbound: null, pair: null };
      report.forEach((s) => {
        if (s.type === "inbound-rtp" && s.kind === "audio") {
          out.inbound = {
            packetsReceived: s.packetsReceived, bytesReceived: s.bytesReceived, totalSamplesReceived: s.totalSamplesReceived,
            totalAudioEnergy: s.totalAudioEnergy, audioLevel: s.audioLevel, concealedSamples: s.concealedSamples,
          };
          const codec = s.codecId && report.get(s.codecId);
          if (codec) out.codec = `${codec.mimeType.replace("audio/", "")} ${codec.clockRate / 1000} kHz`;
        } else if (s.type === "outbound-rtp" && s.kind === "audio") {
          out.outbound = { packetsSent: s.packetsSent, bytesSent: s.bytesSent };
        } else if (s.type === "candidate-pair" && s.nominated) {
          out.pair = s.state;
        }
      });
      return out;
    }

    control(type) {
      if (this.channel && this.channel.readyState === "open") this.channel.send(JSON.stringify({ type }));
    }

    flush() {
      // the gateway drops its queued audio itself; what the jitter buffer holds is a few ms
    }

    async hangup() {
      if (this.hangingUp) return;
      this.hangingUp = true;
      this.control("end");
      if (!this.endedByServer && this.channel?.readyState === "open") {
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, 1000);
          this.channel.addEventListener("close", () => { clearTimeout(timer); resolve(); });
          this.channel.addEventListener("message", (e) => {
            if (parseEvent(e.data)?.type === "end") { clearTimeout(timer); resolve(); }
          });
        });
      }
      this.release();
      finishCall(this, this.endedByServer || "hung up");
    }

    release() {
      if (this.released) return;
      this.released = true;
      clearInterval(this.micTimer);
      this.watches.forEach((w) => w.stop());
      this.pc?.close();
      this.stream?.getTracks().forEach((t) => t.stop());
      ui.audio.srcObject = null;
      if (this.ctx.state !== "closed") this.ctx.close();
      ui.micLevel.value = 0;
    }
  }

  // ---------------------------------------------------------------------------------- call lifecycle
  function chosenTransport() {
    return ui.form.querySelector('input[name="transport"]:checked')?.value || "websocket";
  }

  function callOptions() {
    const instructions = ui.instructions.value.trim();
    return {
      persona: ui.persona.value.trim(),
      number: ui.number.value.trim(),
      phoneCodec: ui.codec.checked,
      token: ui.token.value.trim(),
      context: instructions ? { messages: [{ role: "system", content: instructions }] } : null,
    };
  }

  async function startCall() {
    if (state.call) return;
    clearError();
    const transport = chosenTransport();
    const options = callOptions();
    const call = transport === "webrtc" ? new RtcCall(options) : new WsCall(options);
    state.call = call;
    state.transport = transport;
    state.codec = options.phoneCodec ? "pcmu" : "pcm16";
    state.sessionId = null;
    setInCall(true);
    setStatus("Asking for the microphone…", "connecting");
    try {
      await call.start();
    } catch (err) {
      showError(err instanceof MicError || err instanceof Error ? err.message : String(err));
      call.hangingUp = true;
      call.release();
      finishCall(call, "failed");
    }
  }

  function finishCall(call, reason) {
    if (state.call !== call) return;
    state.call = null;
    setInCall(false);
    if (reason === "failed") {
      setStatus("Call failed", "error");
      return;
    }
    const words = { ended_by_client: "you hung up", "hung up": "you hung up" };
    setStatus(`Call ended — ${words[reason] || reason.replace(/_/g, " ")}`, "ended");
  }

  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    startCall();
  });
  ui.hangup.addEventListener("click", () => state.call?.hangup());
  ui.interrupt.addEventListener("click", () => {
    state.call?.control("interrupt");
  });
  window.addEventListener("pagehide", () => state.call?.hangup());

  // ---------------------------------------------------------------------------------- setup
  async function loadPersonas() {
    try {
      const response = await fetch("/personas", { headers: authHeaders() });
      if (response.status === 401) {
        ui.personaHelp.textContent = "Enter the API key (below) to list this gateway's personas, or type a name.";
        return;
      }
      if (!response.ok) return;
      const { personas = [] } = await response.json();
      ui.personaOptions.replaceChildren(...["default", ...personas.filter((p) => p !== "default")].map((name) => {
        const option = document.createElement("option");
        option.value = name;
        return option;
      }));
      ui.personaHelp.textContent = "Pick one from the list or type a name. Leave empty to use the number below.";
    } catch { /* the picker still takes free text */ }
  }

  function init() {
    const params = new URLSearchParams(window.location.search);
    if (params.has("token")) {
      ui.token.value = params.get("token");
      params.delete("token");      // keep the key out of the address bar, history and screenshots
      const rest = params.toString();
      history.replaceState(null, "", window.location.pathname + (rest ? `?${rest}` : "") + window.location.hash);
    }
    for (const key of ["persona", "number"]) if (params.has(key)) ui[key].value = params.get(key);
    if (params.has("codec")) ui.codec.checked = ["pcmu", "1", "true", "on"].includes(params.get("codec"));
    const transports = pageConfig.transports || ["websocket", "webrtc"];
    for (const input of ui.form.querySelectorAll('input[name="transport"]')) {
      const offered = transports.includes(input.value);
      input.dataset.unavailable = String(!offered);
      input.closest("label").classList.toggle("unavailable", !offered);
      if (!offered) input.closest("label").title = "Not enabled on this gateway (transport setting)";
    }
    const wanted = params.get("transport");
    const pick = transports.includes(wanted) ? wanted : transports[0];
    const radio = $(`transport-${pick}`);
    if (radio) radio.checked = true;
    if (pageConfig.apiKeyRequired && !ui.token.value) ui.token.closest("details").open = true;
    ui.token.addEventListener("change", loadPersonas);
    setInCall(false);
    loadPersonas();
  }

  init();
})();
