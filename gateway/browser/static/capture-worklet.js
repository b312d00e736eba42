/* Microphone capture for the Voxray softphone: Float32 audio at the context's rate in, 20 ms frames of
 * 16-bit PCM at the wire rate (16 kHz, or 8 kHz for the phone codec) out.
 *
 * Loaded twice: as an AudioWorklet module (registers "voxray-capture"), and as a classic script on
 * the page, where Framer serves the ScriptProcessor fallback of browsers without AudioWorklet.
 * When the context already runs at the wire rate (the usual case: the browser resamples the
 * microphone), frames are cut as they come; otherwise each output sample is the mean of the input
 * samples it covers (a box filter: enough anti-aliasing for speech) at a fractional step.
 */
"use strict";

class Framer {
  constructor(inputRate, outputRate, frameMs) {
    this.step = inputRate / outputRate;          // input samples per output sample (>= 1 when downsampling)
    this.size = Math.round(outputRate * frameMs / 1000);
    this.frame = new Int16Array(this.size);
    this.fill = 0;
    this.sum = 0;
    this.count = 0;
    this.edge = this.step;                       // where the current output sample's window ends
    this.pos = 0;
  }

  /* Feed Float32 samples; calls emit(Int16Array, rms) for every full frame. */
  push(samples, emit) {
    for (let i = 0; i < samples.length; i++) {
      if (this.step === 1) {
        this.put(samples[i], emit);
        continue;
      }
      this.sum += samples[i];
      this.count += 1;
      this.pos += 1;
      if (this.pos >= this.edge) {
        this.put(this.sum / this.count, emit);
        this.sum = 0;
        this.count = 0;
        this.edge += this.step;
        if (this.pos > 1e9) { this.pos -= 1e9; this.edge -= 1e9; }   // keep the doubles exact
      }
    }
  }

  put(x, emit) {
    const v = x < -1 ? -1 : x > 1 ? 1 : x;
    this.frame[this.fill++] = v < 0 ? v * 0x8000 : v * 0x7fff;
    if (this.fill === this.size) {
      let energy = 0;
      for (let j = 0; j < this.size; j++) energy += this.frame[j] * this.frame[j];
      const frame = this.frame;
      this.frame = new Int16Array(this.size);   // emit may transfer (detach) the old one
      this.fill = 0;
      emit(frame, Math.sqrt(energy / this.size) / 32768);
    }
  }
}

if (typeof AudioWorkletProcessor !== "undefined") {
  class CaptureProcessor extends AudioWorkletProcessor {
    constructor(options) {
      super();
      const { outputRate, frameMs } = options.processorOptions;
      // sampleRate: the AudioWorkletGlobalScope's rate, i.e. the context's
      this.framer = new Framer(sampleRate, outputRate, frameMs);
      this.emit = (frame, rms) => this.port.postMessage({ frame, rms }, [frame.buffer]);
    }

    process(inputs) {
      const input = inputs[0];
      if (input && input.length) this.framer.push(input[0], this.emit);   // mono: the first channel
      return true;
    }
  }
  registerProcessor("voxray-capture", CaptureProcessor);
}
