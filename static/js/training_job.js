/* Job page: poll /training/jobs/<id>/metrics?after=<cursor> through Poll (poll.js), append
 * the new points to the charts, and update the progress bar, status, queue place or pace,
 * error, log, checkpoints and warnings. Stops once the job ended and its last points are in. */
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root) return;
  var url = root.dataset.metricsUrl;
  var chartsEl = document.getElementById("charts");
  var charts = new window.TrainingCharts.ChartSet(chartsEl, {
    fold: {
      el: document.getElementById("charts-folded"),
      details: document.getElementById("charts-more"),
      count: document.getElementById("charts-more-count"),
      groups: ["perf", "optim"],
    },
  });

  function text(id, value) {
    var el = document.getElementById(id);
    if (el && el.textContent !== value) el.textContent = value;
  }

  function showJob(job) {
    var bar = document.getElementById("job-progress");
    if (bar) bar.value = job.progress;
    text("job-step", job.step + (job.total_steps ? " / " + job.total_steps : ""));
    var badge = document.querySelector("#job-status .badge");
    if (badge) {
      badge.dataset.status = job.status;
      badge.textContent = job.status + (job.cancel_requested && job.status === "running" ? " (cancelling)" : "");
    }
    root.dataset.status = job.status;
    text("job-attempts", "attempt " + job.attempts + " of " + job.max_attempts);
    var err = document.getElementById("job-error");
    if (err) {
      err.hidden = !job.error;
      if (err.textContent !== job.error) err.textContent = job.error;
    }
    text("job-queue", job.queue_note || "");
    var cancel = document.getElementById("cancel-form");
    if (cancel && !job.is_active) cancel.hidden = true;
    if (cancel && job.cancel_requested && cancel.tagName === "DETAILS") {
      var done = document.createElement("p");
      done.className = cancel.className;
      done.id = cancel.id;
      var button = document.createElement("button");
      button.type = "button";
      button.id = "cancel-button";
      button.disabled = true;
      button.textContent = "Cancelling…";
      done.appendChild(button);
      cancel.replaceWith(done);
    }
  }

  // Checkpoints appear as the job registers them (each one soon after the engine saves it).
  function showCheckpoints(rows) {
    var body = document.querySelector("#job-checkpoints tbody");
    if (!body || !rows.length) return;
    rows.forEach(function (c) {
      if (body.querySelector('tr[data-checkpoint-id="' + c.id + '"]')) return;
      var empty = body.querySelector("tr.empty");
      if (empty) empty.remove();
      var tr = document.createElement("tr");
      tr.dataset.checkpointId = String(c.id);
      var link = document.createElement("a");
      link.href = c.url;
      link.textContent = "#" + c.id + " " + c.name;
      var actions = document.createElement("span");
      (c.actions || []).forEach(function (a, i) {
        if (i) actions.appendChild(document.createTextNode(" · "));
        var al = document.createElement("a");
        al.href = a.url;
        al.textContent = a.label;
        actions.appendChild(al);
      });
      var cells = [link, c.role, String(c.step), c.path, actions];
      cells.forEach(function (v) {
        var td = document.createElement("td");
        if (typeof v === "string") td.textContent = v; else td.appendChild(v);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
  }

  // Warnings computed from the metrics (length cap, EOS collapse, an overfit reward model).
  function showWarnings(rows) {
    var list = document.getElementById("job-warnings");
    if (!list) return;
    var key = rows.map(function (w) { return w.code + ":" + w.message; }).join("\n");
    if (list.dataset.key === key) return;
    list.dataset.key = key;
    list.textContent = "";
    rows.forEach(function (w) {
      var li = document.createElement("li");
      li.dataset.code = w.code;
      li.textContent = w.message;
      list.appendChild(li);
    });
    list.hidden = !rows.length;
  }

  var ended = false;
  // The result, an evaluation's win rates and the checkpoint actions are drawn by the server:
  // a page opened while the job ran is reloaded once when it ends, to show them.
  var activeAtLoad = ["queued", "running"].indexOf(root.dataset.status) >= 0;

  function show(data) {
    charts.add(data.series);
    if (charts.count) {
      var empty = document.getElementById("charts-empty");
      if (empty) empty.remove();
      charts.render();
    }
    showJob(data.job);
    var log = document.getElementById("job-log");
    if (log && log.textContent !== data.log_tail) {
      var atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = data.log_tail;
      if (atBottom) log.scrollTop = log.scrollHeight;
    }
    showCheckpoints(data.checkpoints || []);
    showWarnings(data.warnings || []);
    if (data.more || data.job.is_active) return true;
    if (ended) {
      if (activeAtLoad) window.location.reload();
      return false;
    }
    ended = true; // one last poll for the points written as it ended
    return true;
  }

  window.Poll.start({
    url: function (cursor) { return url + "?after=" + cursor; },
    onData: show,
    fastMs: 1500,
    hiddenMs: 15000,
  });
})();
