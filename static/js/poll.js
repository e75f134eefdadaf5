/* One poller for the training pages (job page, job list, compare page).
 *
 * Poll.start({url, cursor, onData, fastMs, hiddenMs, maxMs}) fetches url(cursor) as JSON,
 * hands the answer to onData(data) and takes data.cursor as the next cursor, so each poll
 * asks only for what is new (healthchecks' status_single). It polls every fastMs while the
 * tab is visible, every hiddenMs while it is hidden (and at once when it shows again), and
 * after a failed request it backs off: fastMs doubled per failure in a row, up to maxMs.
 * data.more (the server had more than one answer's worth) fetches the rest at once;
 * onData returning false stops the poller. Returns {stop, now}.
 */
(function () {
  "use strict";

  // The wait before the next request: the pure rule, exported for the browser tests.
  function delay(state, o) {
    var wait = state.hidden ? o.hiddenMs : o.fastMs;
    if (state.failures > 0) {
      wait = Math.max(wait, o.fastMs * Math.pow(2, state.failures));
    }
    return Math.min(wait, o.maxMs);
  }

  function start(opts) {
    var o = {
      fastMs: opts.fastMs || 2000,
      hiddenMs: opts.hiddenMs || 15000,
      maxMs: opts.maxMs || 60000,
    };
    var cursor = opts.cursor || 0;
    var failures = 0;
    var timer = null;
    var busy = false;
    var stopped = false;

    function schedule(ms) {
      if (stopped) return;
      if (timer) clearTimeout(timer);
      var wait = ms !== undefined ? ms : delay({ hidden: document.hidden, failures: failures }, o);
      timer = setTimeout(tick, wait);
    }

    function tick() {
      timer = null;
      if (stopped || busy) return;
      busy = true;
      fetch(opts.url(cursor), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) {
          if (!r.ok) throw new Error("HTTP " + r.status);
          return r.json();
        })
        .then(function (data) {
          busy = false;
          failures = 0;
          if (data.cursor !== undefined) cursor = data.cursor;
          if (opts.onData(data) === false) return stop();
          schedule(data.more ? 0 : undefined);
        })
        .catch(function () {
          busy = false;
          failures += 1;
          schedule();
        });
    }

    function onVisibility() {
      if (!document.hidden && !busy) schedule(0);
    }

    function stop() {
      stopped = true;
      if (timer) clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisibility);
    }

    document.addEventListener("visibilitychange", onVisibility);
    schedule(opts.wait ? undefined : 0);
    return { stop: stop, now: function () { schedule(0); } };
  }

  window.Poll = { start: start, delay: delay };
})();
