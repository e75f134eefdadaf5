/* Shared chart helpers for the training pages (uPlot, vendored under static/vendor/uplot).
 *
 * TrainingCharts.ChartSet keeps every metric series of one job ({key: Map(step -> value)}),
 * merges new points as the page polls, and draws one small uPlot chart per metric key (each
 * on its own scale: a reward of 0.2 and an entropy of 5 do not share an axis), the ones that
 * tell whether training works first: reward, accuracy, win rate, KL, losses. The charts of
 * the groups in `fold` (perf/*, optim/*: how fast, not whether it learns) go into a second
 * container, a <details> the page keeps closed until asked.
 */
(function () {
  "use strict";

  var COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04"];

  function groupOf(key) {
    var i = key.indexOf("/");
    return i > 0 ? key.slice(0, i) : "other";
  }

  var ORDER = ["objective/reward", "objective/rlhf_reward", "reward/accuracy", "eval/win_rate",
    "objective/kl", "loss/", "reward/", "eval/", "objective/", "policy/", "value/", "response/", "optim/", "perf/"];

  function rank(key) {
    for (var i = 0; i < ORDER.length; i++) {
      if (key.indexOf(ORDER[i]) === 0) return i;
    }
    return ORDER.length;
  }

  function byRank(a, b) {
    return rank(a) - rank(b) || (a < b ? -1 : a > b ? 1 : 0);
  }

  function fmt(v) {
    if (v == null) return "";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
    return String(+v.toPrecision(3));
  }

  function chartWidth(el) {
    return Math.max(280, (el.clientWidth || 420) - 12);
  }

  // Align several {step: value} maps on the union of their steps: uPlot's [xs, ys1, ys2...].
  function align(maps) {
    var steps = new Set();
    maps.forEach(function (m) { m.forEach(function (_v, s) { steps.add(s); }); });
    var xs = Array.from(steps).sort(function (a, b) { return a - b; });
    var data = [xs];
    maps.forEach(function (m) {
      data.push(xs.map(function (s) { return m.has(s) ? m.get(s) : null; }));
    });
    return data;
  }

  function makePlot(el, title, labels, data) {
    var series = [{ label: "step" }];
    labels.forEach(function (label, i) {
      series.push({ label: label, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: { show: data[0].length < 40 } });
    });
    var opts = {
      width: chartWidth(el),
      height: 170,
      scales: { x: { time: false } },
      series: series,
      axes: [{}, { size: 60, values: function (_u, vals) { return vals.map(fmt); } }],
      legend: { show: labels.length > 1, live: true },
    };
    return new uPlot(opts, data, el);
  }

  function Chart(container, title) {
    this.box = document.createElement("div");
    this.box.className = "chart";
    this.box.dataset.group = groupOf(title);
    this.box.dataset.key = title;
    var h = document.createElement("h3");
    h.textContent = title;
    this.box.appendChild(h);
    this.plotEl = document.createElement("div");
    this.box.appendChild(this.plotEl);
    container.appendChild(this.box);
    this.plot = null;
    this.labels = [];
    this.title = title;
  }

  Chart.prototype.draw = function (labels, data) {
    if (!window.uPlot) return;
    if (this.plot && labels.join("\u0000") === this.labels.join("\u0000")) {
      this.plot.setData(data);
    } else {
      if (this.plot) this.plot.destroy();
      this.plot = makePlot(this.plotEl, this.title, labels, data);
      this.labels = labels.slice();
    }
    this.box.dataset.points = String(data[0].length);
  };

  Chart.prototype.resize = function () {
    if (this.plot) this.plot.setSize({ width: chartWidth(this.plotEl), height: 170 });
  };

  // options.fold: {el: the folded charts' container, details: its <details>, count: an element
  // that shows how many charts are folded, groups: the metric groups folded}
  function ChartSet(container, options) {
    this.container = container;
    this.fold = options && options.fold && options.fold.el ? options.fold : null;
    this.series = {}; // key -> Map(step -> value)
    this.charts = {}; // group -> Chart
    this.count = 0;
    var self = this;
    function resizeAll() {
      Object.keys(self.charts).forEach(function (g) { self.charts[g].resize(); });
    }
    window.addEventListener("resize", resizeAll);
    // A chart drawn in a closed <details> has no width yet: size it when it opens.
    if (this.fold && this.fold.details) this.fold.details.addEventListener("toggle", resizeAll);
  }

  ChartSet.prototype.home = function (key) {
    var folded = this.fold && (this.fold.groups || ["perf", "optim"]).indexOf(groupOf(key)) >= 0;
    return folded ? this.fold.el : this.container;
  };

  ChartSet.prototype.add = function (series) {
    var self = this;
    Object.keys(series || {}).forEach(function (key) {
      var m = self.series[key] || (self.series[key] = new Map());
      series[key].forEach(function (pt) {
        if (!m.has(pt[0])) self.count += 1;
        m.set(pt[0], pt[1]);
      });
    });
  };

  ChartSet.prototype.render = function () {
    var self = this;
    Object.keys(this.series).sort(byRank).forEach(function (key) {
      var chart = self.charts[key];
      if (!chart) {
        chart = self.charts[key] = new Chart(self.home(key), key);
        self.reorder();
      }
      chart.draw([key], align([self.series[key]]));
    });
    this.container.dataset.points = String(this.count);
    if (this.fold) {
      var folded = this.fold.el.children.length;
      if (this.fold.details) this.fold.details.hidden = !folded;
      if (this.fold.count) this.fold.count.textContent = String(folded);
    }
  };

  // Keep the charts in rank order when a new key appears mid-run.
  ChartSet.prototype.reorder = function () {
    var self = this;
    Object.keys(this.charts).sort(byRank).forEach(function (key) {
      self.home(key).appendChild(self.charts[key].box);
    });
  };

  window.TrainingCharts = { ChartSet: ChartSet, Chart: Chart, align: align, groupOf: groupOf };
})();
