"""The feature viewer's script and style: one renderer for notebook cells, served pages and the static export.

``StrataView.renderFeature(root, data, opts)`` draws one feature's data (:func:`store.features.view.feature_data`);
``StrataView.renderIndex`` the index; ``StrataView.app(root, provider)`` routes on the URL's hash
(``#f=12`` a feature, ``&per=16&page=2`` its top rows' page; ``#token=the``, ``#id=5``, ``#dmin=0.01&dmax=0.2``, ``#sort=count`` the index searched)
over a provider: ``StrataView.served(base)`` (JSON endpoints) or ``StrataView.static(base, chunk)``
(the export's ``data/*.js`` files, which load from disk without a server). Data reaches the page only
through ``textContent`` and ``setAttribute`` on elements it creates, so corpus text is never markup.
"""

from __future__ import annotations

__all__ = ["VIEWER_CSS", "VIEWER_JS"]

VIEWER_CSS = """
.strata-view{font-family:system-ui,sans-serif;color:#222;line-height:1.35;max-width:1100px}
.strata-view table{border-collapse:collapse;margin:4px 0}
.strata-view td,.strata-view th{padding:2px 8px;border-bottom:1px solid #e3e3e3;text-align:right;vertical-align:top}
.strata-view th.sv-sort{cursor:pointer;text-decoration:underline dotted}
.strata-view td.sv-ctx{text-align:left;font-family:ui-monospace,monospace;white-space:pre-wrap;word-break:break-all}
.strata-view td.sv-left,.strata-view th.sv-left{text-align:left}
.strata-view .sv-tok{border-radius:2px}
.strata-view .sv-hit{outline:1.5px solid #a00;font-weight:600}
.strata-view .sv-muted,.strata-view .sv-note{color:#777;font-size:90%}
.strata-view .sv-flag{display:inline-block;padding:0 4px;margin-left:4px;border-radius:3px;font-size:80%;background:#eee}
.strata-view .sv-flag.sv-dead{background:#fdd}.strata-view .sv-flag.sv-dense{background:#ddf}
.strata-view .sv-logits{display:flex;gap:24px;flex-wrap:wrap}
.strata-view .sv-pos td.sv-val{color:#1a6}.strata-view .sv-neg td.sv-val{color:#c22}
.strata-view .sv-nav a{margin-right:14px}
.strata-view .sv-bar{fill:#d0542a}.strata-view svg text{font-size:11px;fill:#333}
.strata-view .sv-axis{stroke:#444;stroke-width:1}
.strata-view form.sv-search input{margin-right:8px}
.strata-view .sv-error{color:#b00}
"""

VIEWER_JS = r"""
(function () {
  if (window.StrataView) return;
  var SV = window.StrataView = {};
  var NS = "http://www.w3.org/2000/svg";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, String(attrs[k]));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function fmt(x) {
    if (x === null || x === undefined) return "";
    var a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return Number(x).toExponential(2);
    return String(+Number(x).toPrecision(4));
  }
  SV.fmt = fmt;
  function link(href, text, cls) {
    var a = el("a", cls, text);
    a.setAttribute("href", href);
    return a;
  }
  function row(cells, cls) {
    var tr = el("tr", cls);
    cells.forEach(function (c) { tr.appendChild(c instanceof Node ? c : el("td", null, c)); });
    return tr;
  }
  function head(names, left) {
    var tr = el("tr");
    names.forEach(function (n, i) { tr.appendChild(el("th", left && left.indexOf(i) >= 0 ? "sv-left" : null, n)); });
    return tr;
  }

  function context(rec, max) {
    var td = el("td", "sv-ctx");
    for (var i = 0; i < rec.tokens.length; i++) {
      var a = rec.acts[i] || 0;
      var s = el("span", i === rec.hit ? "sv-tok sv-hit" : "sv-tok", rec.tokens[i]);
      if (a > 0 && max > 0) {
        s.style.backgroundColor = "rgba(230,90,20," + Math.min(1, a / max).toFixed(3) + ")";
        s.classList.add("sv-on");
      }
      s.setAttribute("data-act", String(a));
      s.setAttribute("title", "activation " + fmt(a));
      td.appendChild(s);
    }
    return td;
  }

  function histogram(h, count) {
    var W = 600, H = 210, L = 64, R = 16, T = 10, B = 44;
    var n = h.counts.length;
    var s = svg("svg", {"class": "sv-hist", width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img",
                        "aria-label": "activation histogram"});
    if (!n) return s;
    var maxc = Math.max.apply(null, h.counts) || 1, pw = W - L - R, ph = H - T - B, bw = pw / n;
    for (var i = 0; i < n; i++) {
      var c = h.counts[i], bh = ph * c / maxc;
      var r = svg("rect", {"class": "sv-bar", x: (L + i * bw).toFixed(1), y: (T + ph - bh).toFixed(1),
                           width: Math.max(bw - 1, 0.5).toFixed(1), height: bh.toFixed(1), "data-count": c});
      r.appendChild(svg("title", {}, "[" + fmt(h.edges[i]) + ", " + fmt(h.edges[i + 1]) + "): " + c));
      s.appendChild(r);
    }
    s.appendChild(svg("line", {"class": "sv-axis", x1: L, y1: T + ph, x2: L + pw, y2: T + ph}));
    s.appendChild(svg("line", {"class": "sv-axis", x1: L, y1: T, x2: L, y2: T + ph}));
    for (var j = 0; j <= 4; j++) {
      var k = Math.round(j * n / 4), x = L + k * bw;
      s.appendChild(svg("line", {"class": "sv-axis", x1: x, y1: T + ph, x2: x, y2: T + ph + 4}));
      s.appendChild(svg("text", {"class": "sv-xtick", x: x, y: T + ph + 16, "text-anchor": "middle"}, fmt(h.edges[k])));
      var yc = Math.round(maxc * j / 4), y = T + ph - ph * yc / maxc;
      s.appendChild(svg("line", {"class": "sv-axis", x1: L - 4, y1: y, x2: L, y2: y}));
      s.appendChild(svg("text", {"class": "sv-ytick", x: L - 6, y: y + 4, "text-anchor": "end"}, String(yc)));
    }
    s.appendChild(svg("text", {x: L + pw / 2, y: H - 6, "text-anchor": "middle"}, "activation (" + count + " activations)"));
    s.appendChild(svg("text", {x: 12, y: T + ph / 2, "text-anchor": "middle",
                               transform: "rotate(-90 12 " + (T + ph / 2) + ")"}, "count"));
    return s;
  }

  function rowsTable(recs, max, first, cls) {
    var t = el("table", cls);
    t.appendChild(head([first, "activation", "doc:pos", "context"], [3]));
    var body = el("tbody");
    t.appendChild(body);
    return {table: t, body: body, fill: function (a, b) {
      body.textContent = "";
      for (var i = a; i < b; i++) {
        var r = recs[i];
        var tr = row([r.q !== undefined ? String(r.q) : String(i + 1), fmt(r.act), r.doc + ":" + r.pos, context(r, max)], cls + "-row");
        tr.setAttribute("data-row", String(r.row));
        body.appendChild(tr);
      }
    }};
  }

  SV.renderFeature = function (root, d, opts) {
    opts = opts || {};
    var href = opts.href || null;
    root.textContent = "";
    root.setAttribute("data-feature", String(d.feature));
    var nav = el("div", "sv-nav");
    if (opts.index) nav.appendChild(link(opts.index, "\u2191 all features", "sv-index"));
    if (href && d.prev !== null) nav.appendChild(link(href(d.prev), "\u2190 feature " + d.prev, "sv-prev"));
    if (href && d.next !== null) nav.appendChild(link(href(d.next), "feature " + d.next + " \u2192", "sv-next"));
    root.appendChild(nav);
    var h = el("h2", "sv-title", "Feature " + d.feature);
    if (d.dead) h.appendChild(el("span", "sv-flag sv-dead", "dead"));
    root.appendChild(h);
    root.appendChild(el("p", "sv-meta", "table " + d.table + " \u00b7 SAE " + d.sae + " \u00b7 " + d.dataset + " : " + d.hook));
    root.appendChild(el("p", d.explanation ? "sv-explanation" : "sv-explanation sv-muted",
                        d.explanation ? d.explanation : "No explanation (features/" + d.table + "/explanations.jsonl has none)."));
    var st = el("table", "sv-stats");
    st.appendChild(row([el("th", null, "count"), String(d.count), el("th", null, "density"), fmt(d.density)]));
    st.appendChild(row([el("th", null, "mean activation"), fmt(d.mean), el("th", null, "max activation"), fmt(d.max)]));
    root.appendChild(st);
    if (d.dead) {
      root.appendChild(el("p", "sv-muted", "This feature never fired on the " + d.encoded_rows + " encoded rows."));
      return;
    }
    root.appendChild(el("h3", null, "Activation histogram"));
    root.appendChild(histogram(d.hist, d.count));
    if (d.logits) {
      root.appendChild(el("h3", null, "Logit effects"));
      root.appendChild(el("p", "sv-note sv-formula", d.logits.note));
      var box = el("div", "sv-logits");
      [["promoted", "pos"], ["suppressed", "neg"]].forEach(function (p) {
        var t = el("table", "sv-" + p[1]);
        t.appendChild(head([p[0], "logit"], [0]));
        d.logits[p[1]].forEach(function (tv) {
          var c = el("td", "sv-left");
          c.appendChild(el("span", "sv-tok sv-logit", tv[0]));
          var v = el("td", "sv-val", fmt(tv[1]));
          t.appendChild(row([c, v], "sv-logit-row"));
        });
        box.appendChild(t);
      });
      root.appendChild(box);
    } else if (d.logits_note) {
      root.appendChild(el("h3", null, "Logit effects"));
      root.appendChild(el("p", "sv-note", d.logits_note));
    }
    if (d.neighbours) {
      root.appendChild(el("h3", null, "Nearest features by decoder cosine"));
      var ul = el("ul", "sv-neighbours");
      d.neighbours.forEach(function (n) {
        var li = el("li");
        li.appendChild(href ? link(href(n[0]), "feature " + n[0], "sv-neighbour") : el("span", "sv-neighbour", "feature " + n[0]));
        li.appendChild(document.createTextNode(" cos " + fmt(n[1])));
        ul.appendChild(li);
      });
      root.appendChild(ul);
    }
    if (d.decoder_norms) {
      root.appendChild(el("h3", null, "Decoder norm per source"));
      var nt = el("table", "sv-norms");
      var top = Math.max.apply(null, d.decoder_norms) || 1;
      d.decoder_norms.forEach(function (v, i) {
        var bar = el("div");
        bar.style.cssText = "height:10px;background:#d0542a;width:" + Math.round(200 * v / top) + "px";
        var c = el("td", "sv-left");
        c.appendChild(bar);
        nt.appendChild(row(["source " + i, fmt(v), c], "sv-norm"));
      });
      root.appendChild(nt);
    }
    var size = opts.pageSize || 16, n = d.top.length, page = Math.max(0, Math.min(opts.page || 0, Math.ceil(n / size) - 1));
    root.appendChild(el("h3", null, "Top activations (" + n + " stored)"));
    var pager = el("div", "sv-pager");
    var prev = el("button", "sv-page-prev", "\u2190 higher"), next = el("button", "sv-page-next", "lower \u2192");
    var label = el("span", "sv-page-label");
    pager.appendChild(prev); pager.appendChild(label); pager.appendChild(next);
    root.appendChild(pager);
    var tt = rowsTable(d.top, d.max, "#", "sv-top");
    root.appendChild(tt.table);
    function show() {
      var a = page * size, b = Math.min(n, a + size);
      tt.fill(a, b);
      label.textContent = " rows " + (a + 1) + "\u2013" + b + " of " + n + " ";
      prev.disabled = page === 0;
      next.disabled = b >= n;
    }
    prev.addEventListener("click", function () { if (page > 0) { page--; show(); } });
    next.addEventListener("click", function () { if ((page + 1) * size < n) { page++; show(); } });
    show();
    if (d.sample && d.sample.length) {
      root.appendChild(el("h3", null, "Samples by activation quantile"));
      root.appendChild(el("p", "sv-note", "Quantile 0 holds the highest activations (" + d.quantiles +
                          " quantiles, rows drawn with the table's seed)."));
      var sq = rowsTable(d.sample, d.max, "quantile", "sv-sample");
      sq.fill(0, d.sample.length);
      root.appendChild(sq.table);
    }
  };

  SV.mountFeature = function (uid) {
    var d = JSON.parse(document.getElementById(uid + "-data").textContent);
    SV.renderFeature(document.getElementById(uid), d, {});
  };

  function flags(idx, f) {
    var out = [];
    if (idx.count[f] === 0) out.push("dead");
    else if (idx.density[f] > idx.dense_threshold) out.push("dense");
    return out;
  }

  SV.renderIndex = function (root, idx, prov, p) {
    root.textContent = "";
    root.removeAttribute("data-feature");
    var n = idx.d_sae, dense = 0;
    for (var f = 0; f < n; f++) if (idx.density[f] > idx.dense_threshold) dense++;
    root.appendChild(el("h2", null, "Feature table " + idx.table));
    root.appendChild(el("p", "sv-meta", "SAE " + idx.sae + " \u00b7 " + idx.dataset + " : " + idx.hook + " \u00b7 " + n + " features over " +
                        idx.encoded_rows + " rows \u00b7 " + idx.dead.length + " dead \u00b7 " + dense + " dense (density > " +
                        idx.dense_threshold + ")"));
    var form = el("form", "sv-search");
    function input(name, ph, val, w) {
      var i = el("input");
      i.name = name; i.id = "sv-q-" + name; i.placeholder = ph; i.value = val || ""; i.style.width = w;
      form.appendChild(i);
      return i;
    }
    var qid = input("id", "feature id", p.id, "7em"), qtok = input("token", "token (in top contexts)", p.token, "14em");
    var qmin = input("dmin", "min density", p.dmin, "7em"), qmax = input("dmax", "max density", p.dmax, "7em");
    var go = el("button", "sv-go", "search");
    go.type = "submit";
    form.appendChild(go);
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var q = [];
      [["id", qid], ["token", qtok], ["dmin", qmin], ["dmax", qmax]].forEach(function (kv) {
        if (kv[1].value.trim()) q.push(kv[0] + "=" + encodeURIComponent(kv[1].value.trim()));
      });
      if (p.sort) q.push("sort=" + encodeURIComponent(p.sort));
      location.hash = q.length ? "#" + q.join("&") : "#";
    });
    root.appendChild(form);
    var status = el("p", "sv-status");
    root.appendChild(status);
    var table = el("table", "sv-index");
    var cols = [["feature", "feature"], ["count", "count"], ["density", "density"], ["mean", "mean"], ["max", "max"]];
    var htr = el("tr");
    var sortKey = p.sort || (p.token ? "match" : "density");
    var desc = p.order ? p.order !== "asc" : sortKey !== "feature";
    cols.forEach(function (c) {
      var th = el("th", "sv-sort", c[0] + (sortKey === c[1] ? (desc ? " \u25bc" : " \u25b2") : ""));
      th.setAttribute("data-key", c[1]);
      th.addEventListener("click", function () {
        var q = location.hash.replace(/^#/, "").split("&").filter(function (s) { return s && !/^(sort|order)=/.test(s); });
        q.push("sort=" + c[1]);
        q.push("order=" + (sortKey === c[1] && desc ? "asc" : "desc"));
        location.hash = "#" + q.join("&");
      });
      htr.appendChild(th);
    });
    htr.appendChild(el("th", "sv-left", "flags"));
    htr.appendChild(el("th", "sv-left", "explanation"));
    table.appendChild(htr);
    var body = el("tbody");
    table.appendChild(body);
    root.appendChild(table);
    var more = el("button", "sv-more", "show more");
    root.appendChild(more);
    var dl = el("details", "sv-dead-list");
    dl.appendChild(el("summary", null, idx.dead.length + " dead feature(s): never fired on the encoded rows"));
    var dp = el("p");
    idx.dead.forEach(function (f, i) {
      if (i) dp.appendChild(document.createTextNode(" "));
      dp.appendChild(link("#f=" + f, String(f), "sv-dead-link"));
    });
    dl.appendChild(dp);
    root.appendChild(dl);

    function render(list, match, note) {
      var dmin = parseFloat(p.dmin), dmax = parseFloat(p.dmax);
      list = list.filter(function (f) {
        return f >= 0 && f < n && !(idx.density[f] < dmin) && !(idx.density[f] > dmax);
      });
      var key = sortKey === "match" && !match ? "density" : sortKey;
      var val = key === "match" ? function (f) { return match[f]; } : key === "feature" ? function (f) { return f; }
        : function (f) { return idx[key][f]; };
      list.sort(function (a, b) { var x = val(a), y = val(b); return x === y ? a - b : (desc ? y - x : x - y); });
      status.textContent = (note ? note + "; " : "") + list.length + " feature(s) shown";
      var limit = 0;
      function page() {
        var stop = Math.min(list.length, limit + 200);
        for (var i = limit; i < stop; i++) {
          var f = list[i], a = el("td");
          a.appendChild(link("#f=" + f, String(f), "sv-feature-link"));
          var fl = el("td", "sv-left");
          flags(idx, f).forEach(function (x) { fl.appendChild(el("span", "sv-flag sv-" + x, x)); });
          var tr = row([a, String(idx.count[f]), fmt(idx.density[f]), fmt(idx.mean[f]), fmt(idx.max[f]), fl,
                        el("td", "sv-left", idx.explanations[String(f)] || "")], "sv-feature");
          tr.setAttribute("data-feature", String(f));
          if (match) tr.setAttribute("data-match", String(match[f]));
          body.appendChild(tr);
        }
        limit = stop;
        more.style.display = limit < list.length ? "" : "none";
      }
      more.onclick = page;
      page();
      root.setAttribute("data-state", "ready");
    }
    var all = [];
    if (p.id !== undefined && p.id !== "") {
      var fid = parseInt(p.id, 10);
      if (!(fid >= 0 && fid < n)) { status.textContent = "no feature " + p.id + ": features are 0\u2013" + (n - 1); render([], null); return; }
      render([fid], null, "feature " + fid);
    } else if (p.token) {
      prov.search(p.token).then(function (hits) {
        var match = {};
        hits.forEach(function (h) { match[h[0]] = h[1]; });
        render(hits.map(function (h) { return h[0]; }), match,
               hits.length + " feature(s) fire on \u201c" + p.token.trim() + "\u201d in their top rows");
      }, function (e) { status.textContent = String(e.message || e); });
    } else {
      for (var g = 0; g < n; g++) all.push(g);
      render(all, null);
    }
  };

  SV.deadData = function (idx, f) {
    return {v: 1, feature: f, d_sae: idx.d_sae, table: idx.table, sae: idx.sae, dataset: idx.dataset, hook: idx.hook,
            encoded_rows: idx.encoded_rows, count: 0, density: 0, mean: 0, max: 0, dead: true,
            prev: f > 0 ? f - 1 : null, next: f + 1 < idx.d_sae ? f + 1 : null, hist: {edges: [], counts: []}, top: [], sample: [],
            logits: null, neighbours: null, decoder_norms: null, explanation: idx.explanations[String(f)] || null};
  };

  function json(url) {
    return fetch(url).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(body.error || r.statusText);
        return body;
      });
    });
  }
  SV.served = function (base) {
    base = base || "";
    return {
      index: function () { return json(base + "api/index"); },
      feature: function (f) { return json(base + "api/feature/" + f); },
      search: function (q) { return json(base + "api/search?token=" + encodeURIComponent(q)); }
    };
  };

  SV._feat = {};
  SV.put = function (m) { for (var k in m) SV._feat[k] = m[k]; };
  SV.static = function (base, chunk) {
    var loaded = {};
    function load(src) {
      if (!loaded[src]) {
        loaded[src] = new Promise(function (res, rej) {
          var s = document.createElement("script");
          s.src = base + src;
          s.onload = function () { res(); };
          s.onerror = function () { rej(new Error("cannot load " + src)); };
          document.head.appendChild(s);
        });
      }
      return loaded[src];
    }
    function unpack(r) {
      if (!Array.isArray(r)) return r;
      var acts = r[5].map(function () { return 0; });
      r[6].forEach(function (iv) { acts[iv[0]] = iv[1]; });
      var o = {row: r[0], doc: r[1], pos: r[2], act: r[3], hit: r[4], t: r[5], acts: acts};
      if (r.length > 7) o.q = r[7];
      return o;
    }
    function expand(d) {
      ["top", "sample"].forEach(function (k) {
        d[k] = d[k].map(unpack);
        d[k].forEach(function (r) {
          if (!r.tokens) r.tokens = r.t.map(function (i) { return SV._vocab[i]; });
        });
      });
      var h = d.hist;
      if (!h.edges) {
        h.edges = [];
        for (var i = 0; i <= h.counts.length; i++) h.edges.push(h.lo + (h.hi - h.lo) * i / h.counts.length);
      }
      return d;
    }
    return {
      index: function () { return load("data/index.js").then(function () { return SV._index; }); },
      feature: function (f) {
        return Promise.all([load("data/index.js"), load("data/vocab.js")]).then(function () {
          var idx = SV._index;
          if (!(f >= 0 && f < idx.d_sae)) throw new Error("no feature " + f + ": features are 0\u2013" + (idx.d_sae - 1));
          if (idx.count[f] === 0) return SV.deadData(idx, f);
          if (idx.exported && idx.exported.indexOf(f) < 0) throw new Error("feature " + f + " was not exported (see --features)");
          return load("data/f" + Math.floor(f / chunk) + ".js").then(function () {
            var d = SV._feat[f], base = SV.deadData(idx, f);
            ["v", "d_sae", "table", "sae", "dataset", "hook", "encoded_rows", "explanation"].forEach(function (k) {
              if (d[k] === undefined) d[k] = base[k];
            });
            return expand(d);
          });
        });
      },
      search: function (q) {
        return load("data/search.js").then(function () { return SV._search[q.trim().toLowerCase()] || []; });
      }
    };
  };

  function params() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var i = kv.indexOf("=");
      out[decodeURIComponent(i < 0 ? kv : kv.slice(0, i))] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1).replace(/\+/g, " "));
    });
    return out;
  }
  SV.app = function (root, prov) {
    var idxP = null;
    function fail(e) {
      root.textContent = "";
      root.appendChild(link("#", "\u2191 all features", "sv-index"));
      root.appendChild(el("p", "sv-error", String(e && e.message ? e.message : e)));
      root.setAttribute("data-state", "error");
    }
    function route() {
      var p = params();
      root.setAttribute("data-state", "loading");
      if (p.f !== undefined) {
        var f = parseInt(p.f, 10);
        prov.feature(f).then(function (d) {
          SV.renderFeature(root, d, {index: "#", href: function (g) { return "#f=" + g; },
                                     pageSize: parseInt(p.per, 10) || 16, page: (parseInt(p.page, 10) || 1) - 1});
          root.setAttribute("data-state", "ready");
          window.scrollTo(0, 0);
        }, fail);
      } else {
        (idxP = idxP || prov.index()).then(function (idx) { SV.renderIndex(root, idx, prov, p); }, fail);
      }
    }
    window.addEventListener("hashchange", route);
    route();
  };
})();
"""
