// rungate dashboard: the runs list (GET /v1/runs), one run's output tailed
// live over the viewer socket (/v1/stream, stream.resume), and live figures
// from GET /metrics. Plain browser JavaScript, no build step, no outside
// resources; the gateway serves this file from its binary.
//
// The viewer token arrives as ?token= in the page URL. It is taken out of
// the address bar at once (history.replaceState) and kept only in this
// script's memory: fetches send it as `Authorization: Bearer`, the
// WebSocket (which cannot set headers) as ?token= on its own URL.
//
// Tail bookkeeping, per opened run: `epoch` is the streamEpoch of the
// history being shown and `next` the offset expected next (last shown + 1).
// Every (re)subscription is `stream.resume {runId, fromOffset: next,
// streamEpoch: epoch}`, so after a dropped socket, a gateway restart or a
// pause the gateway either continues exactly after the last row shown or
// says why it cannot (`truncated`, or another epoch), and the log shows a
// marker saying what was lost. Offsets are numbers: exact up to 2^53.
//
// A run's end (stream.ended) is shown as an ended badge with its outcome,
// in the runs list and over the tail; the tail then stops (nothing more
// comes). The Stop button (run.cancel) is shown only when the token may
// cancel: the page reads the `caps` claim of its own token (the JWT's
// middle part, not verified here: the gateway decides, and a Stop it
// refuses is reported like any other error).

'use strict';

(() => {
  // DOM rows kept in the log; older rows are removed as new ones arrive.
  const MAX_ROWS = 2000;
  // Entries (events and markers) kept in memory, so that changing the type
  // filter can show older matching events again.
  const KEEP = 20000;
  const RUNS_EVERY_MS = 3000;
  const METRICS_EVERY_MS = 2000;
  const SPARK_POINTS = 60;
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_MAX_MS = 15000;
  const REQUEST_TIMEOUT_MS = 15000;
  const RUN_ID = /^[A-Za-z0-9._:-]{1,128}$/;

  const $ = (id) => document.getElementById(id);

  // ---- Token and address bar -------------------------------------------

  function urlWith(params) {
    const q = params.toString();
    return location.pathname + (q ? '?' + q : '') + location.hash;
  }

  const startParams = new URLSearchParams(location.search);
  let token = startParams.get('token') || '';
  const initialRun = startParams.get('run') || '';
  if (startParams.has('token')) {
    startParams.delete('token');
    history.replaceState(history.state, '', urlWith(startParams));
  }
  // Set when the gateway refused the token: no point reconnecting with it.
  let tokenRefused = false;

  function setRunInUrl(runId) {
    const p = new URLSearchParams(location.search);
    if (runId) p.set('run', runId);
    else p.delete('run');
    history.replaceState(history.state, '', urlWith(p));
  }

  // ---- Banners ------------------------------------------------------------

  const banners = new Map();

  function setBanner(key, text, kind) {
    if (text) banners.set(key, { text, kind: kind || 'error' });
    else banners.delete(key);
    const el = $('banner');
    if (!banners.size) {
      el.hidden = true;
      return;
    }
    const all = [...banners.values()];
    el.className = 'banner' + (all.every((b) => b.kind === 'info') ? ' info' : '');
    el.replaceChildren(...all.map((b) => {
      const d = document.createElement('div');
      d.textContent = b.text;
      return d;
    }));
    el.hidden = false;
  }

  function showTokenForm(show) {
    $('token-form').hidden = !show;
    if (show) $('token-input').focus();
  }

  // ---- The viewer socket ------------------------------------------------

  const sock = {
    ws: null,
    state: 'idle',
    attempt: 0,
    timer: null,
    retryAt: 0,
    nextId: 0,
    pending: new Map(),
    // reconnectAfterMs of a gateway.draining push, used for the next wait.
    drainDelay: null,
  };

  function setConn(state, text) {
    sock.state = state;
    $('conn').dataset.state = state;
    $('conn-text').textContent = text;
    $('retry-now').hidden = state !== 'waiting';
  }

  function connect() {
    clearTimeout(sock.timer);
    sock.timer = null;
    if (!token || tokenRefused || sock.ws) return;
    // Relative to the page, so a proxy may serve the gateway under a prefix.
    const url = new URL('v1/stream', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = `?token=${encodeURIComponent(token)}`;
    url.hash = '';
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (e) {
      scheduleReconnect();
      return;
    }
    sock.ws = ws;
    setConn('connecting', sock.attempt ? `connecting (attempt ${sock.attempt + 1})…` : 'connecting…');
    ws.onopen = () => {
      if (sock.ws !== ws) return;
      setConn('open', 'connected');
      onSocketOpen();
    };
    ws.onmessage = (m) => {
      if (sock.ws === ws) onFrame(m.data);
    };
    ws.onclose = () => {
      if (sock.ws !== ws) return;
      sock.ws = null;
      for (const [, p] of sock.pending) {
        clearTimeout(p.timer);
        p.reject(new Error('connection closed'));
      }
      sock.pending.clear();
      onSocketDown();
      scheduleReconnect();
    };
  }

  // Exponential backoff with jitter: the n-th consecutive failure waits a
  // random time in [c/2, c] with c = min(15 s, 0.5 s * 2^n), so a crowd of
  // dashboards does not reconnect in lockstep after a restart. A draining
  // gateway's reconnectAfterMs replaces the first wait (plus jitter).
  function scheduleReconnect() {
    if (sock.timer || sock.ws || !token || tokenRefused) return;
    let delay;
    if (sock.drainDelay != null) {
      delay = sock.drainDelay + Math.random() * Math.min(1000, sock.drainDelay / 2 + 100);
      sock.drainDelay = null;
    } else {
      const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** sock.attempt);
      delay = ceiling / 2 + (Math.random() * ceiling) / 2;
    }
    sock.attempt += 1;
    sock.retryAt = Date.now() + delay;
    sock.timer = setTimeout(() => {
      sock.timer = null;
      connect();
    }, delay);
    tickConn();
  }

  function tickConn() {
    if (sock.timer) {
      const s = Math.max(0, (sock.retryAt - Date.now()) / 1000);
      setConn('waiting', `reconnecting in ${s.toFixed(1)} s`);
    }
  }

  function request(type, payload) {
    return new Promise((resolve, reject) => {
      const ws = sock.ws;
      if (!ws || ws.readyState !== WebSocket.OPEN) {
        reject(new Error('not connected'));
        return;
      }
      sock.nextId += 1;
      const id = 'd' + sock.nextId;
      // A reply that never comes means a stuck connection: start over.
      const timer = setTimeout(() => {
        sock.pending.delete(id);
        reject(new Error('no reply in time'));
        ws.close();
      }, REQUEST_TIMEOUT_MS);
      sock.pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ id, type, payload }));
    });
  }

  function onFrame(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch (e) {
      return;
    }
    if (msg.type === 'reply' || msg.type === 'error') {
      const p = sock.pending.get(msg.id);
      if (!p) return;
      sock.pending.delete(msg.id);
      clearTimeout(p.timer);
      if (msg.type === 'reply') {
        p.resolve(msg.payload);
      } else {
        const err = msg.error || {};
        const e = new Error(err.message || 'error');
        e.code = err.code;
        e.retryable = !!err.retryable;
        p.reject(e);
      }
      return;
    }
    // Pushes. Unknown push types are ignored, as the protocol asks.
    const p = msg.payload || {};
    switch (msg.type) {
      case 'stream.events': onEvents(p); break;
      case 'stream.gap': onGap(p); break;
      case 'stream.closed': onClosed(p); break;
      case 'stream.ended': onEnded(p); break;
      case 'gateway.draining': onDraining(p); break;
      default: break;
    }
  }

  function onSocketOpen() {
    if (!tail.runId) sock.attempt = 0;
    startTail();
    refreshRuns();
  }

  // ---- The tail of one run ------------------------------------------------

  const tail = {
    runId: null,
    epoch: null,
    next: null,
    // Each stream.resume gets a number; a reply is used only if it answers
    // the latest one for the run still open.
    resumeSeq: 0,
    resuming: false,
    subscribed: false,
    paused: false,
    failed: false,
    downAt: null,
    received: 0,
    gaps: 0,
    truncations: 0,
    duplicates: 0,
    // The stream.ended payload once the run ended: nothing more comes.
    ended: null,
  };

  // The capabilities the token claims (see the top of the file).
  function tokenCaps() {
    try {
      const part = token.split('.')[1] || '';
      const json = atob(part.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (part.length % 4)) % 4));
      const caps = JSON.parse(json).caps;
      return Array.isArray(caps) ? caps : [];
    } catch (e) {
      return [];
    }
  }

  function setStopButton() {
    $('stop').hidden = !(tail.runId && !tail.ended && tokenCaps().includes('run.cancel'));
  }

  async function stopRun() {
    const runId = tail.runId;
    if (!runId) return;
    $('stop').disabled = true;
    try {
      const r = await request('run.cancel', { runId, reason: 'stopped from the dashboard' });
      if (runId !== tail.runId) return;
      const text = r.ended
        ? 'the run had already ended.'
        : r.delivered
          ? 'the runtime was told; it decides how to stop and ends the run.'
          : 'the runtime is not connected now; it is told when it comes back.';
      addMarker('note', 'Stop requested', text);
    } catch (e) {
      addMarker('note', 'Stop refused', `${e.code || 'error'}: ${e.message}`);
    } finally {
      $('stop').disabled = false;
    }
  }

  function onEnded(p) {
    if (p.runId !== tail.runId || p.streamEpoch !== tail.epoch || tail.ended) return;
    tail.ended = p;
    tail.subscribed = false;
    const message = p.message ? `: ${p.message}` : '';
    addMarker('ended', 'Run ended', `${p.outcome}${message} (${p.nextOffset} event${p.nextOffset === 1 ? '' : 's'} in all).`, p.streamEpoch);
    setRunStatus('ended', `ended · ${p.outcome}`);
    $('run-status').dataset.outcome = p.outcome;
    setStopButton();
  }

  function shortEpoch(e) {
    return e ? e.slice(0, 8) : '—';
  }

  function setRunStatus(state, text) {
    const el = $('run-status');
    el.dataset.state = state;
    el.textContent = text === undefined ? state : text;
    updateFacts();
  }

  function openRun(runId) {
    if (!RUN_ID.test(runId)) {
      setBanner('open', `“${runId}” is not a run id (letters, digits, . _ : - only; at most 128).`);
      return;
    }
    setBanner('open', null);
    if (tail.runId === runId) return;
    if (tail.runId && tail.subscribed) {
      request('stream.cancel', { runId: tail.runId }).catch(() => {});
    }
    Object.assign(tail, {
      runId,
      epoch: null,
      next: null,
      resuming: false,
      subscribed: false,
      paused: false,
      failed: false,
      downAt: null,
      received: 0,
      gaps: 0,
      truncations: 0,
      duplicates: 0,
      ended: null,
    });
    tail.resumeSeq += 1;
    entries.length = 0;
    pendingDom = [];
    types.clear();
    typeColors.clear();
    $('log').textContent = '';
    $('log').dataset.duplicates = '0';
    following = true;
    $('jump').hidden = true;
    renderChips();
    $('run-title').textContent = runId;
    $('run-title').title = runId;
    document.title = `${runId} · rungate`;
    $('pause').disabled = false;
    $('clear').disabled = false;
    setPauseButton();
    setStopButton();
    delete $('run-status').dataset.outcome;
    setRunInUrl(runId);
    markSelectedRun();
    setRunStatus('resuming', 'opening…');
    startTail();
  }

  function startTail() {
    if (!tail.runId || tail.paused || tail.failed || tail.subscribed || tail.resuming || tail.ended) return;
    if (!sock.ws || sock.ws.readyState !== WebSocket.OPEN) {
      if (!sock.ws && !sock.timer) connect();
      return;
    }
    resume();
  }

  async function resume() {
    const runId = tail.runId;
    tail.resumeSeq += 1;
    const seq = tail.resumeSeq;
    const payload = { runId, fromOffset: tail.next == null ? 0 : tail.next };
    if (tail.epoch) payload.streamEpoch = tail.epoch;
    tail.resuming = true;
    setRunStatus('resuming', tail.next == null ? 'opening…' : `resuming at ${tail.next}…`);
    let info;
    try {
      info = await request('stream.resume', payload);
    } catch (e) {
      if (seq !== tail.resumeSeq || runId !== tail.runId) return;
      tail.resuming = false;
      if (!e.code) return; // the socket went away; reconnecting resumes again
      if (e.retryable) {
        setRunStatus('reconnecting', `${e.code}; retrying`);
        setTimeout(startTail, 1000 + Math.random() * 1000);
      } else {
        tail.failed = true;
        setRunStatus('error', e.code);
        addMarker('closed', 'Cannot follow this run', `${e.code}: ${e.message}`);
      }
      return;
    }
    if (seq !== tail.resumeSeq || runId !== tail.runId) {
      // Overtaken (paused, or another run opened, while it was on its way):
      // the gateway subscribed us anyway, so undo that unless a newer
      // resume of the same run has replaced it.
      if (runId !== tail.runId || tail.paused) request('stream.cancel', { runId }).catch(() => {});
      return;
    }
    tail.resuming = false;
    tail.subscribed = true;
    sock.attempt = 0;
    applyResume(info);
  }

  function applyResume(info) {
    const expected = tail.next;
    const down = tail.downAt ? ` after ${((Date.now() - tail.downAt) / 1000).toFixed(1)} s` : '';
    if (tail.epoch && info.streamEpoch !== tail.epoch) {
      // Another history: the gateway restarted (streams live in memory) or
      // dropped this run's stream. Its offsets start over.
      tail.truncations += 1;
      addMarker(
        'truncated',
        'Stream history replaced',
        `new epoch ${shortEpoch(info.streamEpoch)} (was ${shortEpoch(tail.epoch)}): the gateway restarted or dropped this run's stream` +
          (expected != null && expected > 0 ? `, so whatever followed offset ${expected - 1} of the old history is gone` : '') +
          `. Offsets start over; showing from offset ${info.startOffset}.`,
        info.streamEpoch,
      );
    } else if (info.truncated && expected != null && info.startOffset > expected) {
      tail.truncations += 1;
      const n = info.startOffset - expected;
      addMarker(
        'truncated',
        'History truncated',
        `offsets ${expected}–${info.startOffset - 1} (${n} event${n === 1 ? '' : 's'}) are no longer kept by the gateway; continuing at ${info.startOffset}${down}.`,
        info.streamEpoch,
      );
    } else if (expected == null) {
      const kept = info.nextOffset > info.firstOffset
        ? `offsets ${info.firstOffset}–${info.nextOffset - 1} kept` +
          (info.firstOffset > 0 ? ' (older ones are no longer kept)' : '')
        : 'no events kept yet';
      addMarker(
        'note',
        'Following',
        `epoch ${shortEpoch(info.streamEpoch)}, ${kept}; showing from offset ${info.startOffset}.`,
        info.streamEpoch,
      );
    } else if (tail.downAt) {
      addMarker('note', 'Resumed', `at offset ${info.startOffset}${down}; nothing missed.`, info.streamEpoch);
    }
    tail.downAt = null;
    tail.epoch = info.streamEpoch;
    tail.next = info.startOffset;
    // An ended run: its stream.ended follows the replay at once.
    setRunStatus(info.ended ? 'resuming' : 'live', info.ended ? 'replaying…' : undefined);
  }

  function onSocketDown() {
    if (!tail.runId || tail.ended) return;
    tail.subscribed = false;
    tail.resuming = false;
    tail.resumeSeq += 1;
    if (tail.paused || tail.failed) return;
    if (tail.downAt == null) {
      tail.downAt = Date.now();
      addMarker('note', 'Connection lost', 'reconnecting with backoff…');
    }
    setRunStatus('reconnecting');
  }

  function forThisStream(p) {
    return p.runId === tail.runId && tail.subscribed && !tail.resuming && !tail.paused &&
      p.streamEpoch === tail.epoch;
  }

  function onEvents(p) {
    if (!forThisStream(p)) return;
    for (const item of p.events || []) {
      if (item.offset < tail.next) {
        // Never expected (the gateway promises no duplicates); counted so
        // that a test can tell, and not shown twice.
        tail.duplicates += 1;
        $('log').dataset.duplicates = String(tail.duplicates);
        continue;
      }
      if (item.offset > tail.next) {
        tail.gaps += 1;
        addMarker('gap', 'Offsets skipped', `${tail.next}–${item.offset - 1} never arrived (no stream.gap notice).`);
      }
      addEvent(item);
      tail.next = item.offset + 1;
    }
  }

  function onGap(p) {
    if (!forThisStream(p)) return;
    const n = p.toOffset - p.fromOffset + 1;
    tail.gaps += 1;
    addMarker(
      'gap',
      'Gap',
      `offsets ${p.fromOffset}–${p.toOffset} (${n} event${n === 1 ? '' : 's'}) were missed: this viewer fell behind and the gateway's buffer moved on.`,
    );
    tail.next = Math.max(tail.next, p.toOffset + 1);
  }

  function onClosed(p) {
    if (p.runId !== tail.runId || p.streamEpoch !== tail.epoch) return;
    tail.subscribed = false;
    addMarker('closed', 'Stream closed', `the gateway dropped this run's stream (epoch ${shortEpoch(p.streamEpoch)}); following its next one.`);
    setRunStatus('resuming', 'waiting for the next stream…');
    setTimeout(startTail, 500 + Math.random() * 500);
  }

  function onDraining(p) {
    sock.drainDelay = typeof p.reconnectAfterMs === 'number' ? p.reconnectAfterMs : 1000;
    setConn('draining', 'gateway restarting…');
    if (tail.runId && !tail.paused) {
      addMarker('note', 'Gateway draining', `it is restarting or shutting down; reconnecting in about ${sock.drainDelay} ms.`);
    }
  }

  // Pause cancels the subscription (stream.cancel) instead of buffering in
  // the page: the gateway already keeps the run's recent history, so
  // Resume is a stream.resume from the last offset shown + 1 and loses
  // nothing unless the ring moved past it meanwhile, which the resume reply
  // says (truncated) and the log marks. A long pause thus costs the page no
  // memory and the gateway no subscription. Events that arrive between the
  // click and the cancel reply are dropped; the resume fetches them again.
  function togglePause() {
    if (!tail.runId) return;
    if (!tail.paused) {
      tail.paused = true;
      tail.resuming = false;
      tail.resumeSeq += 1;
      if (tail.subscribed) request('stream.cancel', { runId: tail.runId }).catch(() => {});
      tail.subscribed = false;
      setRunStatus('paused', tail.next ? `paused after offset ${tail.next - 1}` : 'paused');
    } else {
      tail.paused = false;
      tail.failed = false;
      startTail();
    }
    setPauseButton();
  }

  function setPauseButton() {
    const b = $('pause');
    b.textContent = tail.paused ? 'Resume' : 'Pause';
    b.dataset.paused = String(tail.paused);
  }

  // ---- The log --------------------------------------------------------------

  const entries = [];
  let pendingDom = [];
  let flushQueued = false;
  let following = true;
  let unseen = 0;
  const rowEntry = new WeakMap();
  const types = new Map();
  let chipsDirty = false;
  let filter = { include: [], exclude: [], text: '' };

  function addEvent(item) {
    const event = item.event && typeof item.event === 'object' ? item.event : {};
    const type = typeof event.type === 'string' ? event.type : '?';
    types.set(type, (types.get(type) || 0) + 1);
    chipsDirty = true;
    tail.received += 1;
    pushEntry({ kind: 'event', epoch: tail.epoch, offset: item.offset, type, event, received: Date.now() });
  }

  function addMarker(cls, title, text, epoch) {
    pushEntry({ kind: 'marker', cls, title, text, epoch: epoch || tail.epoch, at: Date.now() });
  }

  function pushEntry(e) {
    entries.push(e);
    if (entries.length > KEEP + 1000) entries.splice(0, entries.length - KEEP);
    if (!matches(e)) return;
    pendingDom.push(e);
    // A hidden tab gets no animation frames; keep what waits bounded.
    if (pendingDom.length > 2 * MAX_ROWS) pendingDom.splice(0, pendingDom.length - MAX_ROWS);
    if (!flushQueued) {
      flushQueued = true;
      requestAnimationFrame(flush);
    }
  }

  function escapeRe(s) {
    return s.replace(/[.+?^${}()|[\]\\]/g, '\\$&');
  }

  // "log, tool.*, !token": exact types or globs; "!" excludes.
  function parseFilter(text) {
    const include = [];
    const exclude = [];
    for (const raw of text.split(/[\s,]+/)) {
      const neg = raw.startsWith('!');
      const term = neg ? raw.slice(1) : raw;
      if (!term) continue;
      const re = new RegExp('^' + term.split('*').map(escapeRe).join('.*') + '$');
      (neg ? exclude : include).push({ term, re });
    }
    return { include, exclude, text };
  }

  function matches(e) {
    if (e.kind !== 'event') return true;
    if (filter.include.length && !filter.include.some((f) => f.re.test(e.type))) return false;
    return !filter.exclude.some((f) => f.re.test(e.type));
  }

  // Colours go to types in the order they first appear in this run, so the
  // first eight are all distinct; error-like types are always red.
  const typeColors = new Map();
  function typeClass(type) {
    if (/error|fail|fatal|panic/i.test(type)) return 'terr';
    let c = typeColors.get(type);
    if (!c) {
      c = 't' + (typeColors.size % 8);
      typeColors.set(type, c);
    }
    return c;
  }

  function pad(n, w) {
    return String(n).padStart(w, '0');
  }

  function clock(d) {
    return `${pad(d.getHours(), 2)}:${pad(d.getMinutes(), 2)}:${pad(d.getSeconds(), 2)}.${pad(d.getMilliseconds(), 3)}`;
  }

  function span(cls, text) {
    const s = document.createElement('span');
    s.className = cls;
    s.textContent = text;
    return s;
  }

  function dataText(event) {
    if (!('data' in event)) return '';
    const d = event.data;
    const text = typeof d === 'string' ? d : JSON.stringify(d);
    return text.length > 600 ? text.slice(0, 600) + '…' : text;
  }

  function render(e) {
    if (e.kind === 'marker') {
      const m = document.createElement('div');
      m.className = 'marker ' + e.cls;
      m.dataset.epoch = e.epoch || '';
      const b = document.createElement('b');
      b.textContent = e.title;
      m.append(clock(new Date(e.at)) + '  ', b, ': ' + e.text);
      return m;
    }
    const row = document.createElement('div');
    row.className = 'row ev';
    row.dataset.offset = String(e.offset);
    row.dataset.epoch = e.epoch;
    let time = null;
    if (typeof e.event.timestamp === 'string') {
      const d = new Date(e.event.timestamp);
      time = span('time', isNaN(d) ? e.event.timestamp : clock(d));
      time.title = e.event.timestamp;
    } else {
      time = span('time recv', clock(new Date(e.received)));
      time.title = 'received by this page (the event has no timestamp)';
    }
    const type = span('type ' + typeClass(e.type), e.type);
    type.title = e.type;
    row.append(span('off', String(e.offset)), time, type, span('data', dataText(e.event)));
    rowEntry.set(row, e);
    return row;
  }

  function flush() {
    flushQueued = false;
    const log = $('log');
    let items = pendingDom;
    pendingDom = [];
    if (items.length > MAX_ROWS) items = items.slice(-MAX_ROWS);
    if (items.length) {
      const frag = document.createDocumentFragment();
      for (const e of items) frag.appendChild(render(e));
      log.appendChild(frag);
      const excess = log.childElementCount - MAX_ROWS;
      if (excess > 0) {
        const before = log.scrollHeight;
        const range = document.createRange();
        range.setStartBefore(log.firstElementChild);
        range.setEndAfter(log.children[excess - 1]);
        range.deleteContents();
        // Keep what the reader is looking at in place.
        if (!following) log.scrollTop -= before - log.scrollHeight;
      }
      if (following) {
        log.scrollTop = log.scrollHeight;
      } else {
        unseen += items.length;
        const jump = $('jump');
        jump.textContent = `↓ ${unseen} new`;
        jump.hidden = false;
      }
    }
    if (chipsDirty) renderChips();
    updateFacts();
  }

  function rebuild() {
    const out = [];
    for (let i = entries.length - 1; i >= 0 && out.length < MAX_ROWS; i--) {
      if (matches(entries[i])) out.push(entries[i]);
    }
    out.reverse();
    $('log').textContent = '';
    pendingDom = out;
    following = true;
    unseen = 0;
    $('jump').hidden = true;
    flush();
  }

  function jumpToNewest() {
    following = true;
    unseen = 0;
    $('jump').hidden = true;
    const log = $('log');
    log.scrollTop = log.scrollHeight;
  }

  let lastChips = 0;
  let chipsTimer = null;
  function renderChips() {
    // At most twice a second: thousands of events must not rebuild it each.
    const now = Date.now();
    if (now - lastChips < 500 && types.size) {
      chipsDirty = true;
      if (!chipsTimer) {
        chipsTimer = setTimeout(() => {
          chipsTimer = null;
          if (chipsDirty) renderChips();
        }, 500 - (now - lastChips));
      }
      return;
    }
    lastChips = now;
    chipsDirty = false;
    const included = new Set(filter.include.map((f) => f.term));
    const excluded = new Set(filter.exclude.map((f) => f.term));
    const top = [...types.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, 40);
    $('type-chips').replaceChildren(...top.map(([type, n]) => {
      const c = document.createElement('button');
      c.type = 'button';
      c.className = 'chip' + (included.has(type) ? ' on' : '') + (excluded.has(type) ? ' off' : '');
      c.dataset.type = type;
      c.title = 'Click: show only / also this type. Alt-click: hide it.';
      c.append(span(typeClass(type), type), span('n', String(n)));
      return c;
    }));
  }

  function toggleChip(type, exclude) {
    const term = exclude ? '!' + type : type;
    const terms = filter.text.split(/[\s,]+/).filter(Boolean);
    const i = terms.indexOf(term);
    if (i >= 0) terms.splice(i, 1);
    else terms.push(term);
    $('type-filter').value = terms.join(', ');
    applyFilter();
  }

  function applyFilter() {
    filter = parseFilter($('type-filter').value.trim());
    rebuild();
    lastChips = 0;
    renderChips();
  }

  function updateFacts() {
    $('fact-epoch').textContent = tail.epoch ? shortEpoch(tail.epoch) : '—';
    $('fact-epoch').title = tail.epoch || '';
    $('fact-last').textContent = tail.next != null && tail.next > 0 ? String(tail.next - 1) : '—';
    $('fact-count').textContent = String(tail.received);
    $('fact-gaps').textContent = String(tail.gaps);
    $('fact-trunc').textContent = String(tail.truncations);
    const rows = $('log').childElementCount;
    $('foot-rows').textContent = tail.runId
      ? `${rows} row${rows === 1 ? '' : 's'} shown` + (rows >= MAX_ROWS ? ` (the newest ${MAX_ROWS}; older rows are dropped from view)` : '') +
        (filter.text ? ` · filter: ${filter.text}` : '')
      : '';
  }

  // ---- Runs list ------------------------------------------------------------

  let runs = [];
  let runsInFlight = false;
  const STATE_ORDER = { attached: 0, detached: 1, expired: 2, ended: 3 };

  async function refreshRuns() {
    if (!token || tokenRefused || runsInFlight) return;
    runsInFlight = true;
    try {
      const r = await fetch('v1/runs', { headers: { Authorization: `Bearer ${token}` }, cache: 'no-store' });
      if (r.status === 401 || r.status === 403) {
        const body = await r.json().catch(() => null);
        const why = body && body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${r.status}`;
        tokenRefused = true;
        setBanner('token', `The gateway refused the viewer token (${why}). Paste a valid viewer token.`);
        showTokenForm(true);
        return;
      }
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      const body = await r.json();
      runs = Array.isArray(body.runs) ? body.runs : [];
      setBanner('runs', null);
      renderRuns();
    } catch (e) {
      setBanner('runs', `Cannot reach the gateway at ${location.host} (${e.message}); retrying.`, 'info');
    } finally {
      runsInFlight = false;
    }
  }

  function renderRuns() {
    const q = $('runs-search').value.trim().toLowerCase();
    const shown = runs
      .filter((r) => !q || r.runId.toLowerCase().includes(q))
      .sort((a, b) => (STATE_ORDER[a.state] ?? 9) - (STATE_ORDER[b.state] ?? 9) || (a.runId < b.runId ? -1 : 1));
    const rows = shown.map((r) => {
      const tr = document.createElement('tr');
      tr.dataset.run = r.runId;
      tr.tabIndex = 0;
      const name = document.createElement('td');
      name.className = 'run';
      name.textContent = r.runId;
      name.title = `${r.runId}\nepoch ${r.streamEpoch}`;
      const state = document.createElement('td');
      if (r.state === 'ended') {
        const badge = span(`badge ended ${r.outcome || ''}`, `ended · ${r.outcome || '?'}`);
        badge.title = (r.endedAt ? `ended at ${r.endedAt}` : 'ended') + (r.message ? `\n${r.message}` : '');
        state.append(badge);
      } else {
        state.append(span('badge ' + r.state, r.state));
      }
      const kept = document.createElement('td');
      kept.className = 'num';
      kept.textContent = String(r.nextOffset - r.firstOffset);
      kept.title = r.nextOffset > r.firstOffset ? `offsets ${r.firstOffset}–${r.nextOffset - 1}` : 'nothing kept';
      const next = document.createElement('td');
      next.className = 'num';
      next.textContent = String(r.nextOffset);
      tr.append(name, state, kept, next);
      return tr;
    });
    $('runs-table').tBodies[0].replaceChildren(...rows);
    $('runs-empty').hidden = runs.length > 0;
    $('runs-empty').textContent = 'No runs yet. A run is listed once a runtime attaches or publishes.';
    $('runs-count').textContent = runs.length ? (q ? `${shown.length} of ${runs.length}` : String(runs.length)) : '';
    markSelectedRun();
  }

  function markSelectedRun() {
    for (const tr of $('runs-table').tBodies[0].rows) {
      tr.classList.toggle('selected', tr.dataset.run === tail.runId);
    }
  }

  // ---- Live figures ---------------------------------------------------------

  const series = { connections: [], sessions: [], rate: [] };
  let lastStored = null;
  let metricsInFlight = false;

  // Prometheus/OpenMetrics text: `name{label="v",...} value`.
  function parseMetrics(text) {
    const out = [];
    for (const line of text.split('\n')) {
      if (!line || line[0] === '#') continue;
      const m = /^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = {};
      const re = /(\w+)="((?:[^"\\]|\\.)*)"/g;
      let l;
      while ((l = re.exec(m[2] || ''))) labels[l[1]] = l[2];
      out.push({ name: m[1], labels, value: Number(m[3]) });
    }
    return out;
  }

  function total(samples, name, want) {
    let sum = 0;
    const by = {};
    for (const s of samples) {
      if (s.name !== name) continue;
      if (want && !Object.entries(want).every(([k, v]) => s.labels[k] === v)) continue;
      sum += s.value;
      const key = Object.values(s.labels).join(',');
      by[key] = (by[key] || 0) + s.value;
    }
    return { sum, by };
  }

  function pushPoint(list, v) {
    list.push(v);
    if (list.length > SPARK_POINTS) list.splice(0, list.length - SPARK_POINTS);
  }

  function fmt(v) {
    if (v == null) return '—';
    if (v >= 1e6) return (v / 1e6).toFixed(1) + 'M';
    if (v >= 1e4) return (v / 1e3).toFixed(1) + 'k';
    return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 1 : 0);
  }

  const SVG = 'http://www.w3.org/2000/svg';
  function drawSpark(svg, values) {
    const W = 120;
    const H = 32;
    const known = values.filter((v) => v != null);
    const max = Math.max(1, ...known);
    const step = W / (SPARK_POINTS - 1);
    const x0 = (SPARK_POINTS - values.length) * step;
    const y = (v) => H - 1 - (v / max) * (H - 3);
    const parts = [];
    let seg = [];
    values.forEach((v, i) => {
      if (v == null) {
        if (seg.length) parts.push(seg);
        seg = [];
      } else {
        seg.push([x0 + i * step, y(v)]);
      }
    });
    if (seg.length) parts.push(seg);
    const base = document.createElementNS(SVG, 'path');
    base.setAttribute('class', 'base');
    base.setAttribute('d', `M0 ${H - 0.5} H${W}`);
    const nodes = [base];
    for (const pts of parts) {
      const line = pts.map(([px, py], i) => `${i ? 'L' : 'M'}${px.toFixed(1)} ${py.toFixed(1)}`).join(' ');
      const area = document.createElementNS(SVG, 'path');
      area.setAttribute('class', 'area');
      area.setAttribute('d', `${line} L${pts[pts.length - 1][0].toFixed(1)} ${H} L${pts[0][0].toFixed(1)} ${H} Z`);
      const path = document.createElementNS(SVG, 'path');
      path.setAttribute('class', 'line');
      path.setAttribute('d', pts.length === 1 ? `${line} h0.01` : line);
      nodes.push(area, path);
    }
    svg.replaceChildren(...nodes);
    return known.length ? Math.max(...known) : null;
  }

  function showFigure(id, values, sub) {
    const fig = $(id);
    const current = values.length ? values[values.length - 1] : null;
    fig.querySelector('.value').textContent = fmt(current);
    const peak = drawSpark(fig.querySelector('.spark'), values);
    fig.querySelector('.sub').textContent = sub;
    fig.title = peak == null ? '' : `peak ${fmt(peak)} over the last ${(SPARK_POINTS * METRICS_EVERY_MS) / 60000} min`;
  }

  function labelled(by) {
    return Object.entries(by).filter(([k]) => k).map(([k, v]) => `${k} ${fmt(v)}`).join(' · ');
  }

  async function refreshMetrics() {
    if (metricsInFlight) return;
    metricsInFlight = true;
    let text = null;
    try {
      const r = await fetch('metrics', { cache: 'no-store' });
      if (r.ok) text = await r.text();
    } catch (e) {
      text = null;
    } finally {
      metricsInFlight = false;
    }
    const now = performance.now();
    if (text == null) {
      for (const list of Object.values(series)) pushPoint(list, null);
      lastStored = null;
      showFigure('fig-connections', series.connections, 'gateway unreachable');
      showFigure('fig-sessions', series.sessions, '');
      showFigure('fig-rate', series.rate, '');
      return;
    }
    const samples = parseMetrics(text);
    const conns = total(samples, 'rungate_connections');
    const attached = total(samples, 'rungate_sessions', { state: 'attached' }).sum;
    const detached = total(samples, 'rungate_sessions', { state: 'detached' }).sum;
    const stored = total(samples, 'rungate_stream_events_total', { outcome: 'stored' }).sum;
    let rate = null;
    // A counter that went down means the gateway restarted: no rate for
    // that interval.
    if (lastStored && stored >= lastStored.value && now > lastStored.at) {
      rate = (stored - lastStored.value) / ((now - lastStored.at) / 1000);
    }
    lastStored = { value: stored, at: now };
    pushPoint(series.connections, conns.sum);
    pushPoint(series.sessions, attached + detached);
    pushPoint(series.rate, rate);
    showFigure('fig-connections', series.connections, labelled(conns.by));
    showFigure('fig-sessions', series.sessions, `attached ${fmt(attached)} · detached ${fmt(detached)}`);
    showFigure('fig-rate', series.rate, `${fmt(stored)} stored since start`);
  }

  // ---- Theme ------------------------------------------------------------------

  const THEMES = ['auto', 'light', 'dark'];
  function applyTheme(theme) {
    if (theme === 'auto') delete document.documentElement.dataset.theme;
    else document.documentElement.dataset.theme = theme;
    $('theme').title = theme === 'auto' ? 'Theme: follows the system' : `Theme: ${theme}`;
    $('theme').dataset.theme = theme;
    try {
      localStorage.setItem('rungate.theme', theme);
    } catch (e) {
      // Storage may be off; the theme then lasts for this page only.
    }
  }

  // ---- Wiring -----------------------------------------------------------------

  function begin() {
    tokenRefused = false;
    setBanner('token', null);
    showTokenForm(false);
    refreshRuns();
    connect();
  }

  function init() {
    $('gateway-host').textContent = location.host;
    let theme = 'auto';
    try {
      theme = localStorage.getItem('rungate.theme') || 'auto';
    } catch (e) {
      theme = 'auto';
    }
    applyTheme(THEMES.includes(theme) ? theme : 'auto');
    $('theme').addEventListener('click', () => {
      const now = $('theme').dataset.theme || 'auto';
      applyTheme(THEMES[(THEMES.indexOf(now) + 1) % THEMES.length]);
    });

    $('token-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const value = $('token-input').value.trim();
      if (!value) return;
      token = value;
      $('token-input').value = '';
      setStopButton();
      if (sock.ws) sock.ws.close();
      begin();
    });
    $('retry-now').addEventListener('click', () => connect());
    $('open-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const v = $('open-input').value.trim();
      if (v) openRun(v);
    });
    $('runs-search').addEventListener('input', renderRuns);
    const tbody = $('runs-table').tBodies[0];
    tbody.addEventListener('click', (ev) => {
      const tr = ev.target.closest('tr');
      if (tr) openRun(tr.dataset.run);
    });
    tbody.addEventListener('keydown', (ev) => {
      const tr = ev.target.closest('tr');
      if (tr && (ev.key === 'Enter' || ev.key === ' ')) {
        ev.preventDefault();
        openRun(tr.dataset.run);
      }
    });
    $('pause').addEventListener('click', togglePause);
    $('stop').addEventListener('click', stopRun);
    $('clear').addEventListener('click', () => {
      entries.length = 0;
      pendingDom = [];
      $('log').textContent = '';
      unseen = 0;
      $('jump').hidden = true;
      updateFacts();
    });
    let filterTimer = null;
    $('type-filter').addEventListener('input', () => {
      clearTimeout(filterTimer);
      filterTimer = setTimeout(applyFilter, 150);
    });
    $('type-chips').addEventListener('click', (ev) => {
      const chip = ev.target.closest('.chip');
      if (chip) toggleChip(chip.dataset.type, ev.altKey);
    });
    const log = $('log');
    log.addEventListener('scroll', () => {
      following = log.scrollTop + log.clientHeight >= log.scrollHeight - 24;
      if (following) {
        unseen = 0;
        $('jump').hidden = true;
      }
    });
    log.addEventListener('click', (ev) => {
      if (ev.target.closest('pre')) return;
      const row = ev.target.closest('.row');
      const e = row && rowEntry.get(row);
      if (!e) return;
      const open = row.querySelector('pre');
      if (open) {
        open.remove();
        row.classList.remove('open');
        return;
      }
      const pre = document.createElement('pre');
      pre.textContent = `offset ${e.offset} · epoch ${e.epoch} · received ${new Date(e.received).toISOString()}\n` +
        JSON.stringify(e.event, null, 2);
      row.append(pre);
      row.classList.add('open');
    });
    $('jump').addEventListener('click', jumpToNewest);
    document.addEventListener('keydown', (ev) => {
      if (ev.target.closest('input, textarea, select') || ev.ctrlKey || ev.metaKey || ev.altKey) return;
      if (ev.key === '/') {
        ev.preventDefault();
        $('type-filter').focus();
      } else if (ev.key === 'p' && tail.runId) {
        togglePause();
      } else if (ev.key === 'End') {
        jumpToNewest();
      }
    });

    setInterval(tickConn, 250);
    refreshMetrics();
    setInterval(refreshMetrics, METRICS_EVERY_MS);
    setInterval(refreshRuns, RUNS_EVERY_MS);

    if (token) {
      begin();
    } else {
      setConn('idle', 'no token');
      $('runs-empty').textContent = 'Runs are listed once a viewer token is given.';
      setBanner('token', 'No viewer token: open this page as /?token=<viewer token>, or paste one below.', 'info');
      showTokenForm(true);
    }
    if (initialRun) openRun(initialRun);
    updateFacts();
  }

  init();
})();
