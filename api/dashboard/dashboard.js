/* moonq live dashboard: reads /dashboard/feed (SSE over fetch, so it can send the API key),
   renders the account, charts, batches, jobs and usage, and streams one job's events. */
(function () {
  'use strict';

  const KEY = 'moonq-key';
  const DASH = '—';
  const $ = (id) => document.getElementById(id);

  const state = {
    feed: null,        // AbortController of the running feed
    lastSnap: 0,       // Date.now() of the last snapshot
    admin: null,       // viewer kind of the last snapshot
    cache: {},         // JSON of what each table/chart last rendered
    charts: null,
    jobs: [],          // job rows of the last snapshot
    snap: {},          // the feed's snapshot, merged from its events
    job: null,         // the open job panel: {id, ctrl, lastId, over, text}
  };

  // ---------- small helpers ----------

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function setText(id, text) {
    const e = $(id);
    if (e.textContent !== text) e.textContent = text;
  }

  const num = (v) => (v == null ? DASH : String(v));
  const pill = (status) => el('span', 'pill s-' + status, status);

  // True (and remembered) when value differs from what `key` last rendered.
  function changed(key, value) {
    const json = JSON.stringify(value);
    if (state.cache[key] === json) return false;
    state.cache[key] = json;
    return true;
  }

  const fmtLimit = (used, limit) => `${num(used)} / ${limit ? limit : 'no limit'}`;

  const fmtRate = (r) => (r == null ? DASH : `${r < 100 ? r.toFixed(1) : Math.round(r)} lines/s`);
  const fmtDuration = (d) => (d == null ? DASH : `${d.toFixed(2)} s`);
  const fmtTime = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString([], { hour12: false }) : DASH);

  function fmtEta(s) {
    if (s == null) return DASH;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.round(s / 60)} min`;
    const h = Math.floor(s / 3600);
    return `${h} h ${Math.round((s - h * 3600) / 60)} min`;
  }

  function fmtCost(c, currency) {
    if (c == null) return DASH;
    const v = c >= 1 ? c.toFixed(2) : c >= 0.01 || c === 0 ? c.toFixed(4) : String(Number(c.toPrecision(2)));
    return `${v} ${currency || ''}`.trim();
  }

  // Resolves after ms, or at once when the signal aborts.
  function sleep(ms, signal) {
    return new Promise((resolve) => {
      const t = setTimeout(resolve, ms);
      signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    });
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY);
    return key ? { Authorization: 'Bearer ' + key } : {};
  }

  // The message of a JSON error body ({"error": {"type", "message"}}), else the HTTP status.
  async function errorText(resp) {
    try {
      const body = await resp.json();
      const e = body && body.error;
      if (e && e.message) return e.type ? `${e.type}: ${e.message}` : e.message;
      if (body && typeof body.detail === 'string') return body.detail;
    } catch (_) { /* not JSON */ }
    return `HTTP ${resp.status}`;
  }

  let messageTimer = 0;
  function showMessage(text, kind) {
    const m = $('message');
    m.textContent = text;
    m.className = kind || 'info';
    m.hidden = !text;
    clearTimeout(messageTimer);
    if (text) messageTimer = setTimeout(() => { m.hidden = true; }, kind === 'error' ? 10000 : 4000);
  }

  // ---------- SSE over fetch ----------

  // Reads an SSE body, calling onEvent({event, data, id}) per event; onEvent returning false stops.
  async function readSSE(resp, onEvent) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = '', data = [], event = '', id = null, stop = false;

    function line(l) {
      if (l === '') { // a blank line ends the event
        try {
          if (data.length && onEvent({ event: event || 'message', data: data.join('\n'), id }) === false) stop = true;
        } catch (err) { console.error(err); }
        data = [];
        event = '';
        return;
      }
      if (l[0] === ':') return; // comment (keep-alive ping)
      const i = l.indexOf(':');
      const field = i < 0 ? l : l.slice(0, i);
      let value = i < 0 ? '' : l.slice(i + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') data.push(value);
      else if (field === 'event') event = value;
      else if (field === 'id') id = value;
    }

    while (!stop) {
      const { value, done } = await reader.read();
      if (done) {
        if (buf.endsWith('\r')) line(buf.slice(0, -1)); // a final CR ends a line
        return;
      }
      buf += decoder.decode(value, { stream: true });
      const re = /\r\n|\r|\n/g;
      let start = 0, m;
      while (!stop && (m = re.exec(buf))) {
        if (m[0] === '\r' && re.lastIndex === buf.length) break; // maybe half of a \r\n
        line(buf.slice(start, m.index));
        start = re.lastIndex;
      }
      buf = buf.slice(start);
    }
    reader.cancel().catch(() => {});
  }

  // ---------- the feed ----------

  function stopFeed() {
    if (state.feed) state.feed.abort();
    state.feed = null;
  }

  function startFeed() {
    stopFeed();
    state.feed = new AbortController();
    runFeed(state.feed.signal);
  }

  async function runFeed(signal) {
    let delay = 1000;
    while (!signal.aborted) {
      try {
        const status = $('status-filter').value;
        const url = '/dashboard/feed' + (status ? '?status=' + encodeURIComponent(status) : '');
        const resp = await fetch(url, { headers: authHeaders(), signal, cache: 'no-store' });
        if (resp.status === 401) return showLogin(sessionStorage.getItem(KEY) ? 'The key was rejected.' : '');
        if (!resp.ok) showMessage('Feed: ' + (await errorText(resp)), 'error');
        else {
          state.snap = {}; // a connection's first snapshot is whole; the next, what changed
          await readSSE(resp, (ev) => {
            if (signal.aborted) return false;
            if (onFeedEvent(ev)) delay = 1000;
          });
        }
      } catch (_) { /* network failure or abort: retried below unless aborted */ }
      if (signal.aborted) return;
      await sleep(delay, signal);
      delay = Math.min(delay * 2, 10000);
    }
  }

  // Returns true for a snapshot (resets the reconnect backoff).
  function onFeedEvent(ev) {
    if (ev.event === 'snapshot') {
      state.lastSnap = Date.now();
      $('feed-warning').hidden = true;
      updateLive();
      render(Object.assign(state.snap, JSON.parse(ev.data)));
      return true;
    }
    if (ev.event === 'feed_error') {
      const e = (JSON.parse(ev.data) || {}).error || {};
      const w = $('feed-warning');
      w.textContent = 'The store is not answering: ' + (e.message || 'unknown error') + ' (figures may be stale)';
      w.hidden = false;
    }
    return false;
  }

  function updateLive() {
    const live = Date.now() - state.lastSnap < 3000;
    setText('live', live ? 'live' : 'reconnecting…');
    $('live').classList.toggle('on', live);
  }

  // ---------- rendering a snapshot ----------

  function render(s) {
    const admin = !!(s.viewer && s.viewer.admin);
    if (admin !== state.admin) {
      state.admin = admin;
      state.cache = {}; // tables change columns: rebuild all
      for (const name of ['batches', 'jobs']) $(name).tBodies[0].replaceChildren();
      document.querySelectorAll('th.tenant').forEach((th) => { th.hidden = !admin; });
      document.querySelectorAll('.scope').forEach((e) => { e.textContent = admin ? 'All jobs' : 'Your jobs'; });
    }
    setText('who', admin ? 'admin' : 'tenant ' + (s.viewer ? s.viewer.tenant : '?'));
    // An open API with admin keys: no key shows the one tenant; an admin key shows more.
    $('use-key').hidden = admin || !!sessionStorage.getItem(KEY);
    state.jobs = s.jobs || [];
    renderAccount(s.account || {}, s.mine || {}, admin);
    renderCharts(s.series);
    renderBatches(s.batches || []);
    renderJobs(state.jobs);
    renderUsage(s.usage);
    syncJobFromRow();
  }

  function renderAccount(a, mine, admin) {
    const limits = a.limits || {};
    const used = a.in_use || {};
    setText('permits', fmtLimit(used.permits, limits.concurrency));
    setText('rpm', fmtLimit(used.requests_last_minute, limits.rpm));
    setText('tpm', fmtLimit(used.tokens_last_minute, limits.tpm));
    setText('paused', a.paused ? 'paused' + (a.paused_reason ? ': ' + a.paused_reason : '') : 'no');
    $('paused-card').classList.toggle('warn', !!a.paused);
    setText('workers', num(a.workers));
    $('workers').parentElement.classList.toggle('warn', a.workers === 0);
    const q = admin && a.queue ? a.queue : {};
    setText('queue-interactive', num(q.interactive));
    setText('queue-batch', num(q.batch));
    setText('in-flight', admin ? num(a.in_flight) : DASH);
    setText('mine-queued', num(mine.queued));
    setText('mine-running', num(mine.in_progress));
  }

  // Replaces a table's body; an empty one shows its "No ..." line instead.
  function fillTable(name, rows, makeRow) {
    const frag = document.createDocumentFragment();
    rows.forEach((r) => frag.append(makeRow(r)));
    $(name).tBodies[0].replaceChildren(frag);
    $(name + '-empty').hidden = rows.length > 0;
  }

  function cell(cls, text, title) {
    const td = el('td', cls, text);
    if (title) td.title = title;
    return td;
  }


  // Keeps a table's rows in step with `rows`, keyed by `keyOf`: a row that stays keeps its
  // element (a click, a hover or focus on it survives the next snapshot); `update` sets its
  // cells in place.
  function syncRows(name, rows, keyOf, make, update) {
    const body = $(name).tBodies[0];
    const old = new Map([...body.rows].map((tr) => [tr.dataset.key, tr]));
    let prev = null;
    for (const r of rows) {
      const key = keyOf(r);
      let tr = old.get(key);
      if (tr) old.delete(key);
      else {
        tr = make(r);
        tr.dataset.key = key;
      }
      update(tr, r);
      const at = prev ? prev.nextSibling : body.firstChild;
      if (at !== tr) body.insertBefore(tr, at);
      prev = tr;
    }
    old.forEach((tr) => tr.remove());
    $(name + '-empty').hidden = rows.length > 0;
  }

  // Sets a cell's text (and title) only if it changed.
  function put(td, text, title) {
    if (td.textContent !== text) td.textContent = text;
    if (title !== undefined && td.title !== title) td.title = title;
  }

  function putStatus(td, status) {
    if (td.textContent !== status) td.replaceChildren(pill(status));
  }

  // A row of cells, one per class: `tr.byClass.name` is the cell of class `name`.
  function row(names) {
    const tr = el('tr');
    tr.byClass = {};
    for (const name of names) {
      const td = el('td', name);
      tr.byClass[name.split(' ')[0]] = td;
      tr.append(td);
    }
    return tr;
  }

  function renderBatches(rows) {
    if (!changed('batches', rows)) return;
    const names = ['id mono', ...(state.admin ? ['tenant'] : []), 'status', 'progress-cell',
      'rate num', 'eta num', 'created', 'actions'];
    syncRows('batches', rows, (b) => b.id, (b) => {
      const tr = row(names);
      tr.dataset.batch = b.id;
      tr.byClass['progress-cell'].append(progressBar(), el('div', 'progress-text'));
      return tr;
    }, (tr, b) => {
      const c = tr.byClass;
      put(c.id, b.id, b.id);
      if (c.tenant) put(c.tenant, num(b.tenant));
      putStatus(c.status, b.status);
      setProgress(c['progress-cell'], b);
      put(c.rate, fmtRate(b.rate));
      put(c.eta, fmtEta(b.eta));
      put(c.created, fmtTime(b.created_at));
      const btn = c.actions.querySelector('button.cancel');
      if (b.cancellable && !btn) {
        const add = el('button', 'cancel', 'Cancel');
        add.type = 'button';
        c.actions.append(add);
      } else if (!b.cancellable && btn) btn.remove();
    });
  }

  function progressBar() {
    const bar = el('div', 'progress');
    bar.setAttribute('role', 'progressbar');
    bar.setAttribute('aria-label', 'lines finished');
    bar.setAttribute('aria-valuemin', '0');
    bar.append(el('div', 'bar ok'), el('div', 'bar fail'));
    return bar;
  }

  function setProgress(td, b) {
    const total = b.total || 0, done = b.completed || 0, failed = b.failed || 0;
    const pct = (n) => (total ? Math.min(100, (n / total) * 100) : 0) + '%';
    const bar = td.querySelector('.progress');
    bar.setAttribute('aria-valuenow', String(done + failed));
    bar.setAttribute('aria-valuemax', String(total));
    bar.querySelector('.ok').style.width = pct(done);
    bar.querySelector('.fail').style.width = pct(failed);
    put(td.querySelector('.progress-text'), `${done} done · ${failed} failed · ${total} total`);
  }

  function renderJobs(rows) {
    if (!changed('jobs', rows)) return;
    const names = ['id mono', ...(state.admin ? ['tenant'] : []), 'status', 'model',
      'tokens num', 'duration num', 'attempts num', 'batch mono', 'created'];
    syncRows('jobs', rows, (j) => j.id, (j) => {
      const tr = row(names);
      tr.dataset.job = j.id;
      tr.tabIndex = 0;
      return tr;
    }, (tr, j) => {
      const c = tr.byClass;
      put(c.id, j.id, j.id);
      if (c.tenant) put(c.tenant, num(j.tenant));
      putStatus(c.status, j.status);
      put(c.model, num(j.model));
      put(c.tokens, num(j.tokens));
      put(c.duration, fmtDuration(j.duration));
      put(c.attempts, num(j.attempts));
      put(c.batch, num(j.batch_id), j.batch_id || '');
      put(c.created, fmtTime(j.created_at));
    });
    $('jobs-empty').textContent = $('status-filter').value ? 'No jobs with this status.' : 'No jobs.';
    markSelected();
  }

  function renderUsage(u) {
    if (!u || !changed('usage', u)) return;
    setText('usage-days', num(u.days));
    fillTable('usage', u.rows || [], (r) => {
      const tr = el('tr');
      tr.append(cell('day', r.day), cell('model', r.model), cell('num', num(r.jobs)));
      tr.append(cell('num', num(r.prompt_tokens)), cell('num', num(r.completion_tokens)));
      tr.append(cell('num', num(r.total_tokens)));
      tr.append(cell('num cost', fmtCost(r.cost, u.currency), r.cost == null ? 'no price for this model' : ''));
      return tr;
    });
    const t = u.total || {};
    const unpriced = (u.rows || []).some((r) => r.cost == null) ? ' (models without a price left out)' : '';
    setText('usage-total', `${num(t.jobs)} jobs · ${num(t.total_tokens)} tokens · ${fmtCost(t.cost, u.currency)}${unpriced}`);
  }

  // ---------- charts (uPlot) ----------

  const CHART_HEIGHT = 150;

  function makeChart(id, series, unit, digits) {
    const box = $(id);
    const fmt = (v) => (v == null ? DASH : v.toFixed(digits) + unit);
    const axis = { stroke: '#64748b', font: '11px system-ui, sans-serif',
      grid: { stroke: '#eef1f5', width: 1 }, ticks: { stroke: '#e2e8f0', width: 1, size: 4 } };
    const opts = {
      width: Math.max(box.clientWidth, 200),
      height: CHART_HEIGHT,
      // From 0 (an idle queue is a flat line at the bottom, not mid-chart).
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      series: [{}].concat(series.map((s) => Object.assign({ width: 1.5, value: (u, v) => fmt(v) }, s))),
      axes: [axis, Object.assign({}, axis, { size: 52, values: (u, vals) => vals.map((v) => v + unit) })],
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
    };
    const chart = new uPlot(opts, [[]].concat(series.map(() => [])), box);
    new ResizeObserver(() => {
      const w = box.clientWidth;
      if (w > 0 && w !== chart.width) chart.setSize({ width: w, height: CHART_HEIGHT });
    }).observe(box);
    return chart;
  }

  function renderCharts(series) {
    if (!series || !changed('series', series)) return;
    if (!state.charts) {
      state.charts = {
        jobs: makeChart('chart-jobs', [
          { label: 'completed/s', stroke: '#2563eb', fill: 'rgba(37,99,235,0.08)' },
          { label: 'failed/s', stroke: '#dc2626' },
        ], '', 2),
        tokens: makeChart('chart-tokens', [
          { label: 'tokens/s', stroke: '#7c3aed', fill: 'rgba(124,58,237,0.08)' },
        ], '', 0),
        ttft: makeChart('chart-ttft', [
          { label: 'p50', stroke: '#0891b2' },
          { label: 'p95', stroke: '#d97706' },
        ], ' s', 3),
      };
    }
    const t = series.t || [];
    const col = (name) => series[name] || t.map(() => null);
    state.charts.jobs.setData([t, col('jobs'), col('failed')]);
    state.charts.tokens.setData([t, col('tokens')]);
    state.charts.ttft.setData([t, col('ttft_p50'), col('ttft_p95')]);
  }

  // ---------- batches: cancel ----------

  async function cancelBatch(btn) {
    const id = btn.closest('tr').dataset.batch;
    if (!window.confirm(`Cancel batch ${id}? Lines not yet run will not run.`)) return;
    btn.disabled = true;
    try {
      const url = `/dashboard/batches/${encodeURIComponent(id)}/cancel`;
      const resp = await fetch(url, { method: 'POST', headers: authHeaders() });
      if (resp.status === 401) return showLogin('The key was rejected.');
      if (!resp.ok) {
        showMessage(`Could not cancel ${id}: ${await errorText(resp)}`, 'error');
        btn.disabled = false;
        return;
      }
      showMessage(`Batch ${id} is being cancelled.`, 'info');
    } catch (_) {
      showMessage(`Could not cancel ${id}: the server did not answer.`, 'error');
      btn.disabled = false;
    }
  }

  // ---------- the job panel ----------

  function setJobStatus(status) {
    const e = $('job-status');
    e.textContent = status || DASH;
    e.className = 'pill s-' + (status || 'none');
  }

  function markSelected() {
    const id = state.job ? state.job.id : null;
    for (const tr of $('jobs').tBodies[0].rows) {
      const on = tr.dataset.job === id;
      tr.classList.toggle('selected', on);
      if (on) tr.setAttribute('aria-current', 'true');
      else tr.removeAttribute('aria-current');
    }
  }

  function openJob(id) {
    closeJob();
    const j = { id, ctrl: new AbortController(), lastId: null, over: false, text: document.createTextNode('') };
    state.job = j;
    const row = state.jobs.find((r) => r.id === id) || {};
    setText('job-id', id);
    setJobStatus(row.status);
    setText('job-attempts', num(row.attempts));
    for (const name of ['job-note', 'job-error', 'job-result']) setText(name, '');
    $('job-history').replaceChildren();
    $('job-output').replaceChildren(j.text);
    $('job').hidden = false;
    $('split').classList.add('with-job');
    markSelected();
    streamJob(j);
  }

  function closeJob() {
    if (state.job) state.job.ctrl.abort();
    state.job = null;
    $('job').hidden = true;
    $('split').classList.remove('with-job');
    markSelected();
  }

  // While the job is not over, its status comes from its row in the snapshot.
  function syncJobFromRow() {
    const j = state.job;
    if (!j || j.over) return;
    const row = state.jobs.find((r) => r.id === j.id);
    if (!row) return;
    if ($('job-status').textContent !== row.status) setJobStatus(row.status);
    setText('job-attempts', num(row.attempts));
    // Ended, says the snapshot, yet the stream has not said so for a while: read the job.
    if (['completed', 'failed', 'cancelled'].includes(row.status)) {
      j.endedSeen = j.endedSeen || Date.now();
      if (Date.now() - j.endedSeen > 5000 && !j.loaded) { j.loaded = true; loadJob(j); }
    }
  }

  async function streamJob(j) {
    const url = `/dashboard/jobs/${encodeURIComponent(j.id)}/events`;
    let delay = 1000;
    while (!j.over && !j.ctrl.signal.aborted) {
      try {
        const headers = authHeaders();
        if (j.lastId !== null) headers['Last-Event-ID'] = j.lastId;
        const resp = await fetch(url, { headers, signal: j.ctrl.signal, cache: 'no-store' });
        if (resp.status === 401) return showLogin('The key was rejected.');
        if (resp.status === 204) { // nothing more: the job is over
          j.over = true;
          return loadJob(j);
        }
        if (resp.status === 429 || resp.status >= 500) { // the store is away: try again
          setText('job-note', `${await errorText(resp)} (trying again)`);
          j.trouble = true;
        } else if (!resp.ok) {
          return setText('job-error', await errorText(resp));
        } else {
          await readSSE(resp, (ev) => {
            delay = 1000;
            return onJobEvent(j, ev);
          });
        }
      } catch (_) { /* network failure or abort */ }
      if (j.over || j.ctrl.signal.aborted) return;
      await sleep(delay, j.ctrl.signal);
      delay = Math.min(delay * 2, 10000);
    }
  }

  // The text of a chat.completion.chunk (delta may be missing or not an object).
  function chunkText(chunk) {
    const c = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : null;
    const d = c ? c.delta : null;
    if (!d || typeof d !== 'object' || Array.isArray(d)) return '';
    return typeof d.content === 'string' ? d.content : '';
  }

  function appendOutput(j, s) {
    if (!s) return;
    const out = $('job-output');
    const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    j.text.appendData(s);
    if (atEnd) out.scrollTop = out.scrollHeight;
  }

  const TERMINAL = { done: 'completed', error: 'failed', cancelled: 'cancelled' };

  function onJobEvent(j, ev) {
    if (state.job !== j) return false;
    if (ev.event === 'stream_error') { // the server lost its store: reconnect after lastId
      const e = (JSON.parse(ev.data) || {}).error || {};
      setText('job-note', `${e.message || 'The stream broke'} (trying again)`);
      j.trouble = true;
      return false;
    }
    if (ev.id !== null) j.lastId = ev.id;
    if (j.trouble) { // it streams again
      j.trouble = false;
      setText('job-note', '');
    }
    const msg = JSON.parse(ev.data);
    if (msg.event === 'chunk') {
      appendOutput(j, chunkText(msg.data));
      // A chunk means it runs, whatever the last snapshot said a moment ago.
      if ($('job-status').textContent === 'queued') setJobStatus('in_progress');
    } else if (msg.event === 'retry') {
      const d = msg.data || {};
      j.text.data = ''; // the new attempt starts over
      const next = d.attempt || msg.attempt;
      setText('job-attempts', num(next));
      // Each earlier attempt, and why it ended (replayed for a finished job).
      $('job-history').append(el('li', '', `Attempt ${next - 1}: ${d.reason || 'ended'}; retried`));
    } else if (msg.event === 'trimmed') {
      // The log keeps its latest events (MOONQ_MAX_EVENTS): the text shown misses these
      // until the job's result, which is whole, replaces it at the end.
      const d = msg.data || {};
      j.trimmed = true;
      setText('job-note', `Events ${d.first_seq}–${d.last_seq} are no longer in the job's log: ` +
        'the text starts partway; the whole answer replaces it when the job ends.');
    } else if (TERMINAL[msg.event]) {
      j.over = true;
      setJobStatus(TERMINAL[msg.event]);
      // The attempt that ended, with the status: the record's read below comes a moment later.
      if (msg.attempt) setText('job-attempts', num(msg.attempt));
      loadJob(j);
      return false;
    }
    return true;
  }

  // Fills status, attempts, result and error from GET /dashboard/jobs/{id}.
  async function loadJob(j) {
    try {
      const url = `/dashboard/jobs/${encodeURIComponent(j.id)}`;
      const resp = await fetch(url, { headers: authHeaders(), signal: j.ctrl.signal, cache: 'no-store' });
      if (state.job !== j) return;
      if (!resp.ok) return setText('job-error', await errorText(resp));
      const job = await resp.json();
      if (state.job !== j) return;
      setJobStatus(job.status);
      setText('job-attempts', num(job.attempts));
      const choice = job.result && Array.isArray(job.result.choices) ? job.result.choices[0] : null;
      const message = choice && choice.message;
      if ((j.trimmed || !j.text.data) && message && typeof message.content === 'string') j.text.data = message.content;
      if (job.result || job.usage) {
        const usage = job.usage || (job.result && job.result.usage) || null;
        setText('job-result', JSON.stringify({ finish_reason: choice ? choice.finish_reason : null, usage }, null, 2));
      }
      // An attempt that failed before it streamed left no event: the record says why.
      if (job.last_error && job.attempts > 1 && !$('job-history').childElementCount) {
        $('job-history').append(el('li', '', `Attempt ${job.attempts - 1}: ${job.last_error}; retried`));
      }
      const e = job.error;
      const code = e && e.status_code ? ` (HTTP ${e.status_code})` : '';
      setText('job-error', e ? `${e.type || 'error'}${code}: ${e.message || ''}` : '');
    } catch (_) {
      if (!j.ctrl.signal.aborted) setText('job-error', 'Could not load the job.');
    }
  }

  // ---------- login / logout ----------

  // Stops everything, forgets the key and what was shown, and asks for a key.
  function showLogin(error) {
    stopFeed();
    closeJob();
    sessionStorage.removeItem(KEY);
    Object.assign(state, { cache: {}, admin: null, jobs: [], snap: {} });
    for (const name of ['batches', 'jobs', 'usage']) {
      $(name).tBodies[0].replaceChildren();
      $(name + '-empty').hidden = true;
    }
    // Nothing of the last viewer's stays in the page, shown or not.
    document.querySelectorAll('.card .value [id], .card .value[id]').forEach((e) => { e.textContent = DASH; });
    for (const name of ['job-output', 'job-result', 'job-error', 'job-note', 'job-history', 'usage-total']) $(name).textContent = '';
    if (state.charts) Object.values(state.charts).forEach((c) => c.setData(c.data.map(() => [])));
    $('app').hidden = true;
    $('live').hidden = true;
    $('logout').hidden = true;
    $('use-key').hidden = true;
    $('login').hidden = false;
    setText('who', '');
    setText('login-error', error || '');
    $('key').focus();
  }

  function showApp() {
    $('login').hidden = true;
    $('app').hidden = false;
    $('live').hidden = false;
    $('logout').hidden = !sessionStorage.getItem(KEY);
    startFeed();
  }

  // ---------- wiring ----------

  function init() {
    $('login').addEventListener('submit', (e) => {
      e.preventDefault();
      const key = $('key').value.trim();
      if (!key) return;
      if (!/^[\x21-\x7e]+$/.test(key)) { // what an HTTP header can carry: a paste gone wrong
        setText('login-error', 'A key has only printable ASCII characters, without spaces: check what was pasted.');
        return;
      }
      sessionStorage.setItem(KEY, key);
      $('key').value = '';
      showApp();
    });
    $('logout').addEventListener('click', () => showLogin(''));
    $('use-key').addEventListener('click', () => showLogin(''));
    $('status-filter').addEventListener('change', () => { state.cache.jobs = null; startFeed(); });
    $('batches').addEventListener('click', (e) => {
      const btn = e.target.closest('button.cancel');
      if (btn) cancelBatch(btn);
    });
    const jobsBody = $('jobs').tBodies[0];
    jobsBody.addEventListener('click', (e) => {
      const tr = e.target.closest('tr[data-job]');
      if (tr) openJob(tr.dataset.job);
    });
    jobsBody.addEventListener('keydown', (e) => {
      const tr = e.target.closest('tr[data-job]');
      if (tr && (e.key === 'Enter' || e.key === ' ')) {
        e.preventDefault();
        openJob(tr.dataset.job);
      }
    });
    $('job-close').addEventListener('click', closeJob);
    document.addEventListener('keydown', (e) => { if (e.key === 'Escape' && state.job) closeJob(); });
    setInterval(updateLive, 1000);
    showApp(); // an open deployment needs no key; a 401 shows the form
  }

  init();
})();
