// Calls `tick` every few seconds while the tab is visible; stops while it is hidden and
// catches up at once when it shows again.

export const INTERVAL_MS = 3000;

export class Poller {
  constructor(tick, { interval = INTERVAL_MS, onError = null, onOk = null } = {}) {
    this.tick = tick;
    this.interval = interval;
    this.onError = onError;
    this.onOk = onOk;
    this.timer = null;
    this.busy = false;
    this.stopped = true;
    this.visibility = () => (document.hidden ? clearTimeout(this.timer) : this.schedule(0));
  }

  start() {
    this.stopped = false;
    document.addEventListener("visibilitychange", this.visibility);
    this.schedule(0);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    document.removeEventListener("visibilitychange", this.visibility);
  }

  /** Poll now (after a user action), then keep the usual rhythm. */
  now() {
    this.schedule(0);
  }

  schedule(delay) {
    clearTimeout(this.timer);
    if (this.stopped || document.hidden) return;
    this.timer = setTimeout(() => this.run(), delay);
  }

  async run() {
    if (this.busy) return;
    this.busy = true;
    try {
      await this.tick();
      if (this.onOk) this.onOk();
    } catch (error) {
      if (this.onError) this.onError(error);
    } finally {
      this.busy = false;
      this.schedule(this.interval);
    }
  }
}
