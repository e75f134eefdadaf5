/* Compare page: fetch every selected job's metrics and overlay one metric across runs.
 * Runs that are still going are polled (every 3 s, every 15 s when the tab is hidden). */
(function () {
  "use strict";
  var dataEl = document.getElementById("compare-data");
  var select = document.getElementById("compare-key");
  var chartEl = document.getElementById("compare-chart");
  if (!dataEl || !select || !chartEl) return;
  var jobs = JSON.parse(dataEl.textContent);
  var perJob = {}; // job id -> {key: Map(step -> value)}
  var cursors = {}; // job id -> cursor
  var active = {}; // job id -> still running
  var chart = null;

  function fetchNew(job) {
    return fetch(job.url + "?after=" + (cursors[job.id] || 0), { credentials: "same-origin" })
      .then(function (r) { return r.json(); })
      .then(function (data) {
        var store = perJob[job.id] || (perJob[job.id] = {});
        Object.keys(data.series).forEach(function (key) {
          var m = store[key] || (store[key] = new Map());
          data.series[key].forEach(function (pt) { m.set(pt[0], pt[1]); });
        });
        cursors[job.id] = data.cursor;
        active[job.id] = data.job.is_active;
        if (data.more) return fetchNew(job);
      });
  }

  function keys() {
    var all = new Set();
    Object.keys(perJob).forEach(function (id) { Object.keys(perJob[id]).forEach(function (k) { all.add(k); }); });
    return Array.from(all).sort();
  }

  function fillSelect() {
    var have = new Set(Array.from(select.options).map(function (o) { return o.value; }));
    keys().forEach(function (k) {
      if (have.has(k)) return;
      var o = document.createElement("option");
      o.value = k;
      o.textContent = k;
      select.appendChild(o);
    });
  }

  function draw() {
    var key = select.value;
    if (!key) return;
    var maps = jobs.map(function (j) { return (perJob[j.id] || {})[key] || new Map(); });
    var labels = jobs.map(function (j) { return j.label; });
    if (!chart) chart = new window.TrainingCharts.Chart(chartEl, key);
    chart.title = key;
    chart.box.querySelector("h3").textContent = key;
    chart.draw(labels, window.TrainingCharts.align(maps));
  }

  function refresh() {
    var running = jobs.filter(function (j) { return active[j.id]; });
    if (!running.length) return;
    Promise.all(running.map(fetchNew)).then(function () { fillSelect(); draw(); schedule(); }, schedule);
  }

  function schedule() {
    setTimeout(refresh, document.hidden ? 15000 : 3000);
  }

  Promise.all(jobs.map(fetchNew)).then(function () {
    fillSelect();
    var all = keys();
    var preferred = ["objective/reward", "reward/accuracy", "eval/win_rate", "loss/reward", "loss/sft", "loss/dpo", "loss/policy"];
    var first = preferred.find(function (k) { return all.indexOf(k) >= 0; }) || all[0];
    if (first) { select.value = first; draw(); }
    select.addEventListener("change", draw);
    schedule();
  });
})();
