/* Compare page: poll every selected job's metrics through Poll (poll.js), one poller per run
 * with its own cursor, and overlay one metric across runs. A run's poller stops once the run
 * has ended and its points are in. */
(function () {
  "use strict";
  var dataEl = document.getElementById("compare-data");
  var select = document.getElementById("compare-key");
  var chartEl = document.getElementById("compare-chart");
  if (!dataEl || !select || !chartEl) return;
  var jobs = JSON.parse(dataEl.textContent);
  var perJob = {}; // job id -> {key: Map(step -> value)}
  var chart = null;

  // The final-values table follows the runs that are still going: a key's newest point.
  function showFinal(index, key, value) {
    var row = document.querySelector('#compare-final tr[data-key="' + CSS.escape(key) + '"]');
    var cell = row && row.querySelector('td[data-job="' + index + '"]');
    var text = String(+value.toPrecision(4));
    if (cell && cell.textContent !== text) cell.textContent = text;
  }

  function add(job, index, data) {
    var store = perJob[job.id] || (perJob[job.id] = {});
    Object.keys(data.series).forEach(function (key) {
      var m = store[key] || (store[key] = new Map());
      var points = data.series[key];
      points.forEach(function (pt) { m.set(pt[0], pt[1]); });
      if (points.length) showFinal(index, key, points[points.length - 1][1]);
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

  var PREFERRED = ["objective/reward", "reward/accuracy", "eval/win_rate", "loss/reward", "loss/sft", "loss/dpo", "loss/policy"];

  var picked = false; // the user chose a metric: keep it

  function update() {
    fillSelect();
    if (!picked) {
      var all = keys();
      var first = PREFERRED.find(function (k) { return all.indexOf(k) >= 0; }) || all[0];
      if (!first) return;
      select.value = first;
    }
    draw();
  }

  select.addEventListener("change", function () { picked = true; draw(); });
  jobs.forEach(function (job, index) {
    var ended = false;
    window.Poll.start({
      url: function (cursor) { return job.url + "?after=" + cursor; },
      onData: function (data) {
        add(job, index, data);
        update();
        if (data.more || data.job.is_active) return true;
        if (ended) return false;
        ended = true; // one last poll for the points written as it ended
        return true;
      },
      fastMs: 3000,
      hiddenMs: 15000,
    });
  });
})();
