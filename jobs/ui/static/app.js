// The pages of `sluiceway ui`: they fetch /api/ and draw; they never change a job.
const sluiceway = (() => {
  const REFRESH_MS = 1000;
  const PALETTE = ["#7a5af8", "#0b62c4", "#f79009", "#12b76a", "#d92d20", "#667085"];
  const fmt = (n, digits = 0) => n === null || n === undefined ? "-" :
    Number(n).toLocaleString("en-US", {maximumFractionDigits: digits});
  const when = t => t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "-";
  const bytes = n => n === null || n === undefined ? "-" : n >= 1e6 ? fmt(n / 1e6, 1) + " MB" :
    n >= 1e3 ? fmt(n / 1e3, 1) + " kB" : fmt(n) + " B";
  const esc = s => String(s === null || s === undefined ? "-" : s).replace(/[&<>"]/g,
    c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

  async function get(path) {
    const r = await fetch(path, {cache: "no-store"});
    const doc = await r.json();
    if (!r.ok) throw new Error(doc.error || r.statusText);
    return doc;
  }

  function showError(e) {
    const el = document.getElementById("error");
    el.textContent = e ? String(e.message || e) : "";
    el.hidden = !e;
  }

  function rows(tbody, items, cells) {
    tbody.innerHTML = items.map(item => "<tr>" + cells(item).map(c => `<td>${c}</td>`).join("") + "</tr>").join("");
  }

  async function jobsPage() {
    async function tick() {
      try {
        const jobs = await get("/api/jobs");
        rows(document.querySelector("#jobs tbody"), jobs, j => [
          `<a href="/jobs/${encodeURIComponent(j.name)}">${esc(j.name)}</a>`,
          `<span class="state-${esc(j.state)}">${esc(j.state)}</span>`, fmt(j.epoch), fmt(j.input_rows_per_s),
          fmt(j.last_checkpoint), fmt(j.restarts), esc(j.checkpoint_dir)]);
        document.getElementById("empty").hidden = jobs.length > 0;
        showError(null);
      } catch (e) { showError(e); }
    }
    await tick();
    setInterval(tick, 2 * REFRESH_MS);
  }

  // Vertical lines at the given [time (seconds), color] marks: recoveries, rescales.
  function markers(getMarks) {
    return {hooks: {draw: [u => {
      const ctx = u.ctx;
      ctx.save();
      ctx.lineWidth = 2 * devicePixelRatio;
      for (const [t, color] of getMarks()) {
        const x = Math.round(u.valToPos(t, "x", true));
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
        ctx.strokeStyle = color;
        ctx.beginPath();
        ctx.moveTo(x, u.bbox.top);
        ctx.lineTo(x, u.bbox.top + u.bbox.height);
        ctx.stroke();
      }
      ctx.restore();
    }]}};
  }

  function chart(id, series, getTimes, timeAxis = true) {
    const el = document.getElementById(id);
    const opts = {
      width: Math.max(480, el.clientWidth - 2), height: 220,
      scales: {x: {time: timeAxis}},
      series: [{}, ...series.map(([label, stroke]) => ({label, stroke, width: 2, points: {show: false}}))],
      axes: [{}, {size: 70}],
      plugins: getTimes ? [markers(getTimes)] : [],
    };
    return new uPlot(opts, [[], ...series.map(() => [])], el);
  }

  async function jobPage(name) {
    document.getElementById("name").textContent = name;
    document.title = `sluiceway: ${name}`;
    let marks = [];
    const times = () => marks;
    const charts = {
      rows: chart("chart-rows", [["rows/s in", "#0b62c4"], ["rows/s out", "#12b76a"], ["input rows/s", "#f79009"]], times),
      latency: chart("chart-latency", [["p50 s", "#0b62c4"], ["p99 s", "#f79009"], ["epoch s", "#98a2b3"]], times),
      lag: null,  // a series per source: made when the first answer names them
      ckptDuration: chart("chart-ckpt-duration", [["duration s", "#0b62c4"]], times),
      ckptSize: chart("chart-ckpt-size", [["size bytes", "#12b76a"], ["written bytes", "#f79009"]], times),
    };
    async function tick() {
      let job;
      try { job = await get(`/api/jobs/${encodeURIComponent(name)}`); showError(null); }
      catch (e) { showError(e); return; }
      marks = job.recoveries.map(r => [r.at, "#d92d20"]).concat(job.rescales.map(r => [r.at, "#667085"]));
      summary(job);
      const e = job.epochs;
      charts.rows.setData([e.map(x => x.at), e.map(x => x.rows_in_per_s), e.map(x => x.rows_out_per_s),
                           e.map(x => x.input_rows_per_s)]);
      charts.latency.setData([e.map(x => x.at), e.map(x => x.latency_p50_s), e.map(x => x.latency_p99_s),
                              e.map(x => x.latency_s)]);
      const sources = job.sources.map(s => s.source);
      if (charts.lag === null) {
        charts.lag = chart("chart-lag", sources.map((s, i) => [s, PALETTE[i % PALETTE.length]]), times);
      }
      // An epoch recorded before per-source lag existed has the total only: a job of one source shows it.
      const lagOf = (x, s) => s in x.source_lag ? x.source_lag[s].records : (sources.length === 1 ? x.lag : null);
      charts.lag.setData([e.map(x => x.at), ...sources.map(s => e.map(x => lagOf(x, s)))]);
      rows(document.querySelector("#sources tbody"), job.sources, s => [
        esc(s.source), esc(s.kind || ""), fmt(s.records), fmt(s.oldest_s, 1)]);
      const done = job.checkpoints.filter(c => c.status === "complete");
      charts.ckptDuration.setData([done.map(c => c.at), done.map(c => c.duration_s)]);
      charts.ckptSize.setData([done.map(c => c.at), done.map(c => c.size_bytes), done.map(c => c.written_bytes)]);
      for (const [id, n] of [["chart-rows", e.length], ["chart-latency", e.length], ["chart-lag", e.length],
                             ["chart-ckpt-duration", done.length], ["chart-ckpt-size", done.length]]) {
        document.getElementById(id).dataset.points = n;  // what a test (or a curious user) can read
      }
      rows(document.querySelector("#recoveries tbody"), job.recoveries.slice().reverse(), r => [
        when(r.at), esc(r.failure), fmt(r.restored_checkpoint), fmt(r.detect_s, 2), fmt(r.restore_s, 2),
        fmt(r.caught_up_s, 2), esc((r.replay_epochs || []).join(", ") || "none"),
        esc((r.restarted_tasks || []).join(", "))]);
      rows(document.querySelector("#checkpoints tbody"), job.checkpoints.slice().reverse(), c => [
        fmt(c.id), esc(c.status), when(c.at), fmt(c.duration_s, 3), bytes(c.size_bytes), bytes(c.written_bytes),
        esc([c.savepoint ? "savepoint" : "", c.reason || "",
             c.status === "complete" && !c.retained ? "state removed by retention" : ""]
            .filter(Boolean).join("; ") || "")]);
      graph(job.graph);
      logLag(job.log_lag);
    }
    function summary(job) {
      const cards = [["state", job.state], ["epoch", fmt(job.epoch)], ["input rows/s", fmt(job.input_rows_per_s)],
                     ["last checkpoint", fmt(job.last_checkpoint)], ["restarts", fmt(job.restarts)],
                     ["parallelism", typeof job.parallelism === "object" && job.parallelism ?
                       Object.entries(job.parallelism).map(([s, n]) => `${s} ${n}`).join(", ") : fmt(job.parallelism)]];
      document.getElementById("summary").innerHTML = cards.map(([label, value]) =>
        `<div class="card" data-label="${esc(label)}"><div class="label">${esc(label)}</div>` +
        `<div class="value">${esc(value)}</div></div>`).join("");
    }
    function graph(g) {
      document.getElementById("graph").innerHTML = g.stages.map(s =>
        `<div class="stage"><strong>${esc(s.id)}</strong> × ${s.parallelism}` +
        (s.input ? ` <span class="muted">← ${esc(s.input)}${s.key ? " by " + esc(s.key) : ""}</span>` : "") +
        `<div class="steps">${s.steps.map(esc).join(" → ")}</div>` +
        s.tasks.map(t => `<div class="task">${esc(t.task)} on ${esc(t.node ? t.node.slice(0, 12) : "?")}</div>`)
          .join("") + "</div>").join("");
    }
    function logLag(topics) {
      document.getElementById("log-lag").innerHTML = topics.map(t => `<h2>log topic ${esc(t.topic)} ` +
        `(source ${esc(t.source)})</h2>` + (t.error ? `<p class="error">${esc(t.error)}</p>` :
        `<table><thead><tr><th>partition</th><th>end offset</th><th>this job's position</th><th>lag</th></tr></thead>` +
        `<tbody>${t.partitions.map(p => `<tr><td>${p.partition}</td><td>${fmt(p.end)}</td><td>${fmt(p.position)}</td>` +
        `<td>${fmt(p.lag)}</td></tr>`).join("")}</tbody></table>`)).join("");
    }
    await tick();
    setInterval(tick, REFRESH_MS);
  }

  return {jobsPage, jobPage};
})();
