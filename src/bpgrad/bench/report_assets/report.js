// Interactive curves of a bpgrad report: plain JavaScript drawing SVG, no library, no network.
//
// Input: the JSON in <script id="bpgrad-data"> (bpgrad.bench.html_report.chart_data): per
// problem, the optimizer labels (their order fixes the colours) and charts, each with series of
// x, mean and std (null = no finite value there). Output: one <svg> per <figure data-chart>,
// a legend whose buttons hide or show an optimizer in every chart of its problem, buttons that
// switch each axis between linear and log, and a tooltip with the values nearest the pointer.
// Curves are <path class="curve" data-optimizer="LABEL">, so tests can find them in the DOM.
(function () {
  "use strict";
  var SVG_NS = "http://www.w3.org/2000/svg";
  var PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  var W = 640, H = 380;
  var PAD = {left: 70, right: 18, top: 12, bottom: 48};
  var MARKERS_UP_TO = 60;  // points per series below which each point gets a marker

  function svg(name, attrs, parent) {
    var node = document.createElementNS(SVG_NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function tag(name, attrs, parent, text) {
    var node = document.createElement(name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function colour(labels, label) {
    var i = labels.indexOf(label);
    if (i < 0) i = labels.length;
    return i < PALETTE.length ? PALETTE[i] : "hsl(" + Math.round((i * 137.5) % 360) + ",55%,42%)";
  }

  function fmt(v) {
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2).replace("e+", "e");
    return String(Number(v.toPrecision(4)));
  }

  function usable(v, log) {
    return v !== null && v !== undefined && isFinite(v) && (!log || v > 0);
  }

  // ---- scales and ticks -----------------------------------------------------------------

  function niceStep(span, count) {
    var raw = span / count;
    var step = Math.pow(10, Math.floor(Math.log10(raw)));
    var ratio = raw / step;
    if (ratio >= 7.5) step *= 10;
    else if (ratio >= 3.5) step *= 5;
    else if (ratio >= 1.5) step *= 2;
    return step;
  }

  function linearTicks(lo, hi, integer) {
    var step = niceStep(hi - lo, 6), ticks = [];
    if (integer) step = Math.max(1, step);  // steps and epochs: no tick at epoch 1.5
    for (var t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
      ticks.push(Math.abs(t) < step * 1e-9 ? 0 : Number(t.toPrecision(12)));
    }
    return ticks;
  }

  function logTicks(lo, hi) {
    var first = Math.floor(Math.log10(lo)), last = Math.ceil(Math.log10(hi));
    var decades = last - first, ticks = [];
    var every = Math.max(1, Math.ceil(decades / 8));
    var mantissas = decades <= 1 ? [1, 2, 3, 4, 5, 6, 7, 8, 9] : decades <= 2 ? [1, 2, 5] : [1];
    for (var e = first; e <= last; e += every) {
      mantissas.forEach(function (m) {
        var t = m * Math.pow(10, e);
        if (t >= lo * (1 - 1e-9) && t <= hi * (1 + 1e-9)) ticks.push(t);
      });
    }
    if (ticks.length < 2) ticks = [lo, hi];  // less than a decade: label the ends
    return ticks;
  }

  function domain(values, log) {
    var lo = Infinity, hi = -Infinity;
    values.forEach(function (v) {
      if (usable(v, log)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    });
    if (lo === Infinity) return null;
    if (log) {
      var l0 = Math.log10(lo), l1 = Math.log10(hi), pad = Math.max((l1 - l0) * 0.04, 0.05);
      return [Math.pow(10, l0 - pad), Math.pow(10, l1 + pad)];
    }
    if (lo === hi) { var d = Math.abs(lo) * 0.1 || 1; return [lo - d, hi + d]; }
    var p = (hi - lo) * 0.04;
    return [lo - p, hi + p];
  }

  function scale(dom, a, b, log, integer) {
    var f = log ? Math.log10 : function (v) { return v; };
    var d0 = f(dom[0]), d1 = f(dom[1]);
    return {
      log: log, lo: dom[0], hi: dom[1],
      map: function (v) { return a + (f(v) - d0) / (d1 - d0) * (b - a); },
      invert: function (p) {
        var v = d0 + (p - a) / (b - a) * (d1 - d0);
        return log ? Math.pow(10, v) : v;
      },
      ticks: function () {
        return log ? logTicks(dom[0], dom[1]) : linearTicks(dom[0], dom[1], integer);
      }
    };
  }

  // ---- one chart --------------------------------------------------------------------------

  function Chart(figure, spec, group) {
    this.figure = figure;
    this.spec = spec;
    this.group = group;  // shared by the charts of one problem: labels, hidden set, charts
    this.xlog = false;
    this.ylog = !!spec.y_log;
    var body = figure.querySelector(".chart-body");
    this.toolbar = tag("div", {"class": "toolbar"}, body);
    this.legend = tag("div", {"class": "legend"}, body);
    this.holder = tag("div", {"class": "plot-holder"}, body);
    this.svg = svg("svg", {"class": "plot", viewBox: "0 0 " + W + " " + H, role: "img",
                           "aria-label": spec.title, "data-chart": spec.id}, this.holder);
    this.tooltip = tag("div", {"class": "tooltip", hidden: ""}, this.holder);
    this.buildToolbar();
    this.buildLegend();
    this.bindHover();
  }

  Chart.prototype.buildToolbar = function () {
    var self = this;
    [["x", "xlog"], ["y", "ylog"]].forEach(function (pair) {
      var button = tag("button", {type: "button", "class": "axis-toggle", "data-axis": pair[0]},
                       self.toolbar);
      button.addEventListener("click", function () {
        self[pair[1]] = !self[pair[1]];
        self.render();
      });
    });
  };

  Chart.prototype.buildLegend = function () {
    var self = this, group = this.group;
    group.labels.concat(this.spec.series.map(function (s) { return s.label; }))
      .filter(function (label, i, all) { return all.indexOf(label) === i; })
      .forEach(function (label) {
        var series = self.spec.series.filter(function (s) { return s.label === label; })[0];
        if (!series) return;
        var button = tag("button", {type: "button", "class": "legend-item",
                                    "data-optimizer": label}, self.legend);
        var swatch = tag("span", {"class": "swatch"}, button);
        swatch.style.background = colour(group.labels, label);
        tag("span", {}, button, label + (series.n_seeds > 1 ? " (n=" + series.n_seeds + ")" : ""));
        button.addEventListener("click", function () {
          if (group.hidden[label]) delete group.hidden[label]; else group.hidden[label] = true;
          group.charts.forEach(function (chart) { chart.render(); });
        });
      });
  };

  Chart.prototype.visible = function () {
    var hidden = this.group.hidden;
    return this.spec.series.filter(function (s) { return !hidden[s.label]; });
  };

  Chart.prototype.render = function () {
    var self = this, spec = this.spec, root = this.svg, group = this.group;
    while (root.firstChild) root.removeChild(root.firstChild);
    this.tooltip.hidden = true;
    root.setAttribute("data-x-scale", this.xlog ? "log" : "linear");
    root.setAttribute("data-y-scale", this.ylog ? "log" : "linear");
    this.toolbar.querySelectorAll(".axis-toggle").forEach(function (button) {
      var log = button.getAttribute("data-axis") === "x" ? self.xlog : self.ylog;
      button.textContent = button.getAttribute("data-axis") + ": " + (log ? "log" : "linear");
      button.setAttribute("aria-pressed", String(log));
    });
    this.legend.querySelectorAll(".legend-item").forEach(function (button) {
      var off = !!group.hidden[button.getAttribute("data-optimizer")];
      button.classList.toggle("off", off);
      button.setAttribute("aria-pressed", String(!off));
    });

    var shown = this.visible(), xs = [], ys = [];
    shown.forEach(function (s) {
      s.x.forEach(function (x, i) {
        var m = s.mean[i], sd = s.std[i] || 0;
        if (!usable(x, self.xlog) || !usable(m, self.ylog)) return;
        xs.push(x);
        ys.push(m, m + sd);
        if (!self.ylog || m - sd > 0) ys.push(m - sd);
      });
    });
    var xd = domain(xs, this.xlog), yd = domain(ys, this.ylog);
    var left = PAD.left, right = W - PAD.right, top = PAD.top, bottom = H - PAD.bottom;
    if (!xd || !yd) {
      svg("text", {x: W / 2, y: H / 2, "class": "empty", "text-anchor": "middle"}, root)
        .textContent = shown.length ? "no values to draw on this scale (log needs values > 0)"
                                    : "every optimizer is hidden: click one in the legend";
      this.sx = this.sy = null;
    } else {
      var integerX = xs.every(function (x) { return Math.round(x) === x; });
      var sx = scale(xd, left, right, this.xlog, integerX);
      var sy = scale(yd, bottom, top, this.ylog, false);
      this.sx = sx; this.sy = sy;
      this.drawAxes(sx, sy);
      var clipId = "clip-" + spec.id.replace(/[^A-Za-z0-9_-]/g, "_");
      var clip = svg("clipPath", {id: clipId}, svg("defs", {}, root));
      svg("rect", {x: left, y: top, width: right - left, height: bottom - top}, clip);
      var layer = svg("g", {"clip-path": "url(#" + clipId + ")"}, root);
      spec.series.forEach(function (s) { self.drawSeries(layer, s, sx, sy); });
    }
    this.overlay = svg("rect", {"class": "overlay", x: left, y: top, width: right - left,
                                height: bottom - top}, root);
    this.guide = svg("line", {"class": "guide", y1: top, y2: bottom, visibility: "hidden"}, root);
    this.dots = svg("g", {"class": "hover-dots"}, root);
  };

  Chart.prototype.drawAxes = function (sx, sy) {
    var root = this.svg, spec = this.spec;
    var left = PAD.left, right = W - PAD.right, top = PAD.top, bottom = H - PAD.bottom;
    var axes = svg("g", {"class": "axes"}, root);
    sy.ticks().forEach(function (t) {
      var y = sy.map(t);
      svg("line", {"class": "grid", x1: left, x2: right, y1: y, y2: y}, axes);
      svg("text", {x: left - 6, y: y + 4, "text-anchor": "end"}, axes).textContent = fmt(t);
    });
    sx.ticks().forEach(function (t) {
      var x = sx.map(t);
      svg("line", {"class": "grid", x1: x, x2: x, y1: top, y2: bottom}, axes);
      svg("text", {x: x, y: bottom + 16, "text-anchor": "middle"}, axes).textContent = fmt(t);
    });
    svg("rect", {"class": "frame", x: left, y: top, width: right - left, height: bottom - top},
        axes);
    svg("text", {"class": "axis-label", x: (left + right) / 2, y: H - 8,
                 "text-anchor": "middle"}, axes).textContent = spec.x_label;
    svg("text", {"class": "axis-label", x: 0, y: 0, "text-anchor": "middle",
                 transform: "translate(14," + (top + bottom) / 2 + ") rotate(-90)"}, axes)
      .textContent = spec.y_label;
  };

  Chart.prototype.drawSeries = function (layer, s, sx, sy) {
    var self = this, hidden = !!this.group.hidden[s.label];
    var stroke = colour(this.group.labels, s.label);
    var line = "", upper = [], lower = [], band = "", points = 0, pen = false;
    function closeBand() {
      if (upper.length > 1) band += "M" + upper.join("L") + "L" + lower.reverse().join("L") + "Z";
      upper = []; lower = [];
    }
    s.x.forEach(function (x, i) {
      var m = s.mean[i];
      if (!usable(x, self.xlog) || !usable(m, self.ylog)) { pen = false; closeBand(); return; }
      var px = sx.map(x).toFixed(1), py = sy.map(m).toFixed(1);
      line += (pen ? "L" : "M") + px + " " + py;
      pen = true;
      points += 1;
      var sd = s.std[i] || 0, lo = m - sd;
      if (self.ylog && lo <= 0) lo = sy.lo;
      upper.push(px + " " + sy.map(m + sd).toFixed(1));
      lower.push(px + " " + sy.map(lo).toFixed(1));
    });
    closeBand();
    var g = svg("g", {"class": "series", "data-optimizer": s.label}, layer);
    if (hidden) g.setAttribute("display", "none");
    if (s.n_seeds > 1 && band) {
      svg("path", {"class": "band", d: band, fill: stroke, "data-optimizer": s.label}, g);
    }
    svg("path", {"class": "curve", d: line, stroke: stroke, "data-optimizer": s.label,
                 "data-points": String(points), "data-hidden": String(hidden)}, g);
    if (points <= MARKERS_UP_TO) {
      s.x.forEach(function (x, i) {
        if (!usable(x, self.xlog) || !usable(s.mean[i], self.ylog)) return;
        svg("circle", {"class": "marker", cx: sx.map(x).toFixed(1),
                       cy: sy.map(s.mean[i]).toFixed(1), r: 2.6, fill: stroke}, g);
      });
    }
  };

  // Index of the usable point of ``s`` whose x is nearest ``x`` (x values are increasing).
  Chart.prototype.nearest = function (s, x) {
    var best = -1, dist = Infinity, self = this;
    var lo = 0, hi = s.x.length - 1;
    while (hi - lo > 1) {
      var mid = (lo + hi) >> 1;
      if (s.x[mid] === null || s.x[mid] < x) lo = mid; else hi = mid;
    }
    // Look a little around the bisection point: gaps (nulls) can hide the nearest value.
    for (var i = Math.max(0, lo - 8); i <= Math.min(s.x.length - 1, hi + 8); i++) {
      if (!usable(s.x[i], self.xlog) || !usable(s.mean[i], self.ylog)) continue;
      var d = Math.abs(self.sx.map(s.x[i]) - self.sx.map(x));
      if (d < dist) { dist = d; best = i; }
    }
    return best;
  };

  Chart.prototype.bindHover = function () {
    var self = this, root = this.svg;
    root.addEventListener("mousemove", function (event) {
      if (!self.sx || !root.getScreenCTM()) return;
      var pt = root.createSVGPoint();
      pt.x = event.clientX; pt.y = event.clientY;
      var p = pt.matrixTransform(root.getScreenCTM().inverse());
      self.hover(p.x, p.y);
    });
    root.addEventListener("mouseleave", function () { self.unhover(); });
  };

  Chart.prototype.unhover = function () {
    this.tooltip.hidden = true;
    if (this.guide) this.guide.setAttribute("visibility", "hidden");
    if (this.dots) while (this.dots.firstChild) this.dots.removeChild(this.dots.firstChild);
  };

  // Show the values nearest the pointer at SVG coordinates (px, py).
  Chart.prototype.hover = function (px, py) {
    var self = this, sx = this.sx, sy = this.sy;
    if (!sx || px < PAD.left || px > W - PAD.right || py < PAD.top || py > H - PAD.bottom) {
      this.unhover();
      return;
    }
    var x = sx.invert(px), hits = [];
    this.visible().forEach(function (s) {
      var i = self.nearest(s, x);
      if (i >= 0) hits.push({s: s, i: i, dist: Math.abs(sx.map(s.x[i]) - px)});
    });
    if (!hits.length) { this.unhover(); return; }
    var at = hits.reduce(function (a, b) { return b.dist < a.dist ? b : a; }).s;
    var xStar = at.x[hits.filter(function (h) { return h.s === at; })[0].i];
    var gx = sx.map(xStar);
    // Only the series with a point near the guide: a curve that ended earlier says nothing here.
    hits = hits.filter(function (h) { return Math.abs(sx.map(h.s.x[h.i]) - gx) <= 20; });
    this.guide.setAttribute("x1", gx); this.guide.setAttribute("x2", gx);
    this.guide.setAttribute("visibility", "visible");
    while (this.dots.firstChild) this.dots.removeChild(this.dots.firstChild);
    var tip = this.tooltip;
    tip.textContent = "";
    tip.setAttribute("data-x", String(xStar));
    tag("div", {"class": "tip-x"}, tip, this.spec.x_label + " " + fmt(xStar));
    hits.sort(function (a, b) { return b.s.mean[b.i] - a.s.mean[a.i]; });
    hits.forEach(function (h) {
      var s = h.s, m = s.mean[h.i], sd = s.std[h.i];
      var stroke = colour(self.group.labels, s.label);
      svg("circle", {cx: sx.map(s.x[h.i]), cy: sy.map(m), r: 4, fill: stroke}, self.dots);
      var row = tag("div", {"class": "tip-row", "data-optimizer": s.label}, tip);
      tag("span", {"class": "swatch"}, row).style.background = stroke;
      var text = s.label + ": " + fmt(m) + (s.n_seeds > 1 && sd ? " ± " + fmt(sd) : "");
      if (s.x[h.i] !== xStar) text += " (at " + fmt(s.x[h.i]) + ")";
      tag("span", {}, row, text);
    });
    tip.hidden = false;
    var box = this.holder.getBoundingClientRect();
    var cssX = gx / W * box.width, cssY = py / H * box.height;
    var width = tip.offsetWidth;
    tip.style.left = (cssX + 12 + width > box.width ? Math.max(0, cssX - 12 - width) : cssX + 12)
      + "px";
    tip.style.top = Math.max(0, Math.min(cssY - 10, box.height - tip.offsetHeight)) + "px";
  };

  // ---- page ---------------------------------------------------------------------------------

  function main() {
    var source = document.getElementById("bpgrad-data");
    var data = JSON.parse(source.textContent);
    var specs = {}, curves = 0;
    data.problems.forEach(function (problem) {
      var group = {labels: problem.labels, hidden: {}, charts: []};
      problem.charts.forEach(function (spec) { specs[spec.id] = {spec: spec, group: group}; });
    });
    document.querySelectorAll("figure.chart").forEach(function (figure) {
      var entry = specs[figure.getAttribute("data-chart")];
      if (!entry) throw new Error("no data for chart " + figure.getAttribute("data-chart"));
      var chart = new Chart(figure, entry.spec, entry.group);
      entry.group.charts.push(chart);
      chart.render();
      curves += entry.spec.series.length;
    });
    document.body.setAttribute("data-curves", String(curves));
    document.body.setAttribute("data-status", "ready");
  }

  try {
    main();
  } catch (err) {
    // Recorded by errors.js; the status says the page is incomplete.
    document.body.setAttribute("data-status", "failed");
    if (window.bpgradRecordError) window.bpgradRecordError(err && err.stack ? err.stack : err);
    else throw err;
  }
})();
