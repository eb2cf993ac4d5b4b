// The operator console's behaviour (crate::console): polls the admin port every POLL_MS, draws what it reads,
// and sends the actions (redrive, delete) with the admin token.
//
// Rules kept throughout:
// - Nothing read from the server (or typed by the user) is ever parsed as HTML: elements are built with
//   createElement and filled with text nodes and textContent only.
// - The admin token is kept in this tab's sessionStorage only and sent as `Authorization: Bearer` by fetch on
//   the actions, never on reads, never in a URL or a cookie. A 401 or 403 is shown as it came.
// - Table rows are kept from one poll to the next (keyed), so that a button does not vanish under the pointer.
'use strict';

(() => {
  const TOKEN_KEY = 'fanout.adminToken';
  const POLL_MS = 1500;
  const DEAD_PAGE = 100;

  const $ = (id) => document.getElementById(id);

  /** An element with properties (`class`, `dataset` or any DOM property) and children (strings become text). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'class') node.className = v;
      else if (k === 'dataset') Object.assign(node.dataset, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c !== null && c !== undefined) node.append(c);
    }
    return node;
  }

  /** Sets a node's text only when it changed (keeps selections and avoids needless layout). */
  function setText(node, text) {
    const t = String(text);
    if (node.textContent !== t) node.textContent = t;
  }

  // ---- notices and the live indicator ----

  function notice(kind, text) {
    const n = $('notice');
    n.dataset.kind = kind;
    n.textContent = text;
    n.hidden = false;
  }

  function live(ok, text) {
    const l = $('live');
    l.dataset.state = ok ? 'ok' : 'error';
    setText(l, text);
  }

  // ---- the admin token ----

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  }

  let adminActions = true;

  function showTokenState() {
    const t = token();
    let state = t ? 'token set for this tab' : 'no token: reading only';
    if (!adminActions) state = 'admin actions are disabled on this fanout (no --admin-token-file)';
    setText($('token-state'), state);
    $('token-forget').disabled = !t;
  }

  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const value = $('token').value.trim();
    if (!value) {
      notice('error', 'Paste the admin token first (make run writes it to .run/admin-token).');
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    $('token').value = '';
    showTokenState();
    notice('ok', 'Token kept for this tab: redrive and delete will send it.');
  });

  $('token-forget').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenState();
    notice('ok', 'Token forgotten.');
  });

  // ---- HTTP ----

  async function getJson(path) {
    const r = await fetch(path, { cache: 'no-store', credentials: 'omit' });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(`${path}: ${r.status} ${r.statusText}${body && body.error ? ': ' + body.error : ''}`);
    return body;
  }

  /** Sends an admin action; shows its outcome (a 401/403 plainly) and refreshes. True when it succeeded. */
  async function act(method, path, what) {
    const t = token();
    if (!t) {
      notice('error', `${what}: enter the admin token first (make run writes it to .run/admin-token).`);
      return false;
    }
    let r;
    try {
      r = await fetch(path, {
        method,
        cache: 'no-store',
        credentials: 'omit',
        headers: { Authorization: `Bearer ${t}` },
      });
    } catch (e) {
      notice('error', `${what}: fanout did not answer (${e.message}).`);
      return false;
    }
    const body = await r.json().catch(() => ({}));
    const detail = body && body.error ? body.error : r.statusText;
    if (r.status === 401) {
      notice('error', `${what}: refused, 401 Unauthorized: the token is not the admin token. ${detail}`);
    } else if (r.status === 403) {
      notice('error', `${what}: refused, 403 Forbidden: ${detail}`);
    } else if (!r.ok) {
      notice('error', `${what}: ${r.status} ${r.statusText}: ${detail}`);
    } else {
      const done = 'redriven' in body ? `${body.redriven} redriven` : `${body.discarded} deleted`;
      notice('ok', `${what}: ${done}.`);
    }
    refreshNow();
    return r.ok;
  }

  // ---- formatting ----

  function seconds(s) {
    if (!(s > 0)) return '–';
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }

  /** An RFC 3339 time of the server's, shorter: `2026-12-02 16:47:23Z`. */
  function shortTime(at) {
    return String(at).replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }

  /** How long before `now` the RFC 3339 time `at` was (both from the server's clock). */
  function ago(at, now) {
    const s = (Date.parse(now) - Date.parse(at)) / 1000;
    if (!Number.isFinite(s)) return at;
    return s < 1 ? 'just now' : `${seconds(s)} ago`;
  }

  const LEVELS = {
    closed: 'ok', open: 'bad', half_open: 'warn',
    delivered: 'ok', pending: 'warn', dead_letter: 'bad', discarded: 'bad', refused: 'bad', failed: 'bad',
    recovering: 'warn', done: 'ok',
  };

  function badge(text) {
    return el('span', { class: 'badge', dataset: { level: LEVELS[text] || '' } }, text.replace('_', '-'));
  }

  function setBadge(node, text) {
    setText(node, text.replace('_', '-'));
    node.dataset.level = LEVELS[text] || '';
  }

  // ---- two-step buttons for what cannot be undone ----

  /** A button that asks for a second click ("confirm") before it runs `action`; leaving it disarms it. */
  function armedButton(label, cls, action) {
    const b = el('button', { type: 'button', class: `danger ${cls}`, textContent: label });
    const disarm = () => {
      b.classList.remove('armed');
      b.textContent = label;
    };
    b.addEventListener('blur', disarm);
    b.addEventListener('click', async () => {
      if (!b.classList.contains('armed')) {
        b.classList.add('armed');
        b.textContent = `Confirm ${label.toLowerCase()}`;
        return;
      }
      disarm();
      b.disabled = true;
      try {
        await action();
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  function button(label, cls, action) {
    const b = el('button', { type: 'button', class: cls, textContent: label });
    b.addEventListener('click', async () => {
      b.disabled = true;
      try {
        await action();
      } finally {
        b.disabled = false;
      }
    });
    return b;
  }

  // ---- keyed tables ----

  /** Makes `tbody`'s rows those of `items`, in order: rows of known keys are kept and updated, others made. */
  function syncRows(tbody, items, keyOf, create, update) {
    const old = new Map();
    for (const tr of Array.from(tbody.rows)) old.set(tr.dataset.key, tr);
    let prev = null;
    for (const item of items) {
      const key = keyOf(item);
      let tr = old.get(key);
      if (tr) {
        old.delete(key);
      } else {
        tr = create(item);
        tr.dataset.key = key;
      }
      update(tr, item);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (tr !== want) tbody.insertBefore(tr, want);
      prev = tr;
    }
    for (const tr of old.values()) tr.remove();
  }

  const q = encodeURIComponent;

  // ---- backends ----

  function backendRow(b) {
    const backend = b.backend;
    const cells = [
      el('td', { class: 'backend' }, backend),
      el('td', {}, badge(b.breaker)),
      el('td', { class: 'num queue' }),
      el('td', { class: 'num oldest' }),
      el('td', { class: 'num rate' }),
      el('td', { class: 'num inflight' }),
      el('td', { class: 'num dead' }),
      el('td', { class: 'last-error' }),
      el('td', {}, el('div', { class: 'actions' },
        button('Redrive all', 'redrive-all',
          () => act('POST', `/dead-letters/redrive?backend=${q(backend)}`, `Redrive every dead letter of ${backend}`)),
        armedButton('Delete all', 'delete-all',
          () => act('DELETE', `/dead-letters?backend=${q(backend)}`, `Delete every dead letter of ${backend}`)))),
    ];
    return el('tr', { dataset: { backend } }, ...cells);
  }

  function updateBackend(tr, b, now) {
    const c = tr.cells;
    setBadge(c[1].firstChild, b.breaker);
    tr.dataset.breaker = b.breaker;
    setText(c[2], b.pending);
    c[2].classList.toggle('busy', b.pending > 0);
    setText(c[3], seconds(b.oldest_pending_seconds));
    setText(c[4], b.attempts_per_sec.toFixed(1));
    setText(c[5], b.in_flight);
    setText(c[6], b.dead_letters);
    c[6].classList.toggle('bad', b.dead_letters > 0);
    const e = b.last_error;
    setText(c[7], e ? `${e.status ? e.status + ' ' : ''}${e.outcome}, ${ago(e.at, now)}` : '–');
    c[7].title = e ? `last failed attempt at ${e.at}` : '';
    for (const btn of c[8].querySelectorAll('button')) {
      if (!btn.classList.contains('armed')) btn.disabled = b.dead_letters === 0;
    }
  }

  // ---- dead letters ----

  function deadRow(d) {
    const what = `${d.delivery_id} on ${d.backend}`;
    const path = `/dead-letters/${q(d.delivery_id)}`;
    const backend = `?backend=${q(d.backend)}`;
    return el('tr', { dataset: { id: d.delivery_id, backend: d.backend } },
      el('td', { class: 'id' }, el('button', {
        type: 'button',
        class: 'link',
        title: 'look this delivery up',
        textContent: d.delivery_id,
        onclick: () => startLookup(d.delivery_id),
      })),
      el('td', { class: 'backend' }, d.backend),
      el('td', {}, d.path),
      el('td', {}, d.reason),
      el('td', { class: 'num' }, String(d.attempts)),
      el('td', { class: 'num' }, d.last_status === null ? '–' : String(d.last_status)),
      el('td', { class: 'since', title: d.dead_at }),
      el('td', {}, el('div', { class: 'actions' },
        button('Redrive', 'redrive', () => act('POST', `${path}/redrive${backend}`, `Redrive ${what}`)),
        armedButton('Delete', 'delete', () => act('DELETE', `${path}${backend}`, `Delete ${what}`)))));
  }

  function renderDead(list, now) {
    const items = list.dead_letters;
    const total = typeof list.total === 'number' ? list.total : list.count;
    syncRows($('dead').tBodies[0], items, (d) => `${d.delivery_id}|${d.backend}`, deadRow,
      (tr, d) => setText(tr.cells[6], ago(d.dead_at, now)));
    const t = $('dead-total');
    setText(t, total);
    t.dataset.level = total > 0 ? 'bad' : 'ok';
    $('dead').hidden = items.length === 0;
    $('dead-empty').hidden = items.length > 0;
    const more = $('dead-more');
    more.hidden = total <= items.length;
    setText(more, `Showing the oldest ${items.length} of ${total}. "Redrive all" and "Delete all" above act on every ` +
      'dead letter of a backend.');
  }

  // ---- recoveries ----

  function recoveryRow() {
    const bar = el('progress', { max: 1, value: 0 });
    return el('tr', {},
      el('td', { class: 'backend' }),
      el('td', {}, badge('recovering')),
      el('td', { class: 'progress' }, bar, el('span')),
      el('td', { class: 'since nowrap' }),
      el('td', { class: 'num eta' }));
  }

  function updateRecovery(tr, r, now) {
    const c = tr.cells;
    tr.dataset.backend = r.backend;
    tr.dataset.state = r.state;
    setText(c[0], r.backend);
    setBadge(c[1].firstChild, r.state);
    const done = r.total - r.remaining;
    const bar = c[2].firstChild;
    bar.max = Math.max(r.total, 1);
    bar.value = r.total === 0 ? 1 : done;
    let text = `${done} of ${r.total} · ${r.queued} queued again · started ${ago(r.started_at, now)}`;
    if (!r.complete) text += `; the history starts at ${r.history_from || '(empty)'}: older writes are not recovered`;
    setText(c[2].lastChild, text);
    setText(c[3], shortTime(r.since));
    c[3].title = r.since;
    setText(c[4], r.eta_seconds === null ? '–' : seconds(r.eta_seconds));
  }

  // ---- one delivery ----

  let lookupId = '';

  function startLookup(id) {
    $('lookup-id').value = id;
    lookupId = id.trim();
    $('lookup-result').replaceChildren(el('p', { class: 'hint' }, 'Looking up…'));
    showLookup();
  }

  $('lookup-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    startLookup($('lookup-id').value);
  });

  async function showLookup() {
    const id = lookupId;
    const out = $('lookup-result');
    if (!id) {
      out.replaceChildren();
      return;
    }
    let r;
    let body;
    try {
      r = await fetch(`/deliveries/${q(id)}`, { cache: 'no-store', credentials: 'omit' });
      body = await r.json().catch(() => ({}));
    } catch (e) {
      out.replaceChildren(el('p', { class: 'error-text' }, `fanout did not answer (${e.message})`));
      return;
    }
    if (id !== lookupId) return;
    if (!r.ok) {
      out.replaceChildren(el('p', { class: 'error-text', id: 'lookup-error' },
        `${r.status}: ${body.error || r.statusText}. Asked for: `, el('code', {}, id)));
      return;
    }
    const head = el('p', { class: 'lookup-head' }, badge(body.state), ' ', el('code', {}, body.delivery_id),
      el('span', { class: 'hint' }, ` accepted ${shortTime(body.accepted_at)}`));
    const rows = body.backends.map((b) => el('tr', { dataset: { backend: b.backend, state: b.state } },
      el('td', { class: 'backend' }, b.backend),
      el('td', {}, badge(b.state)),
      el('td', { class: 'num' }, String(b.attempts)),
      el('td', { class: 'num' }, b.status === null ? '–' : String(b.status)),
      el('td', {}, [b.outcome, b.reason, b.next_attempt_at ? `next attempt ${b.next_attempt_at}` : null]
        .filter(Boolean).join(', ') || '–')));
    const table = el('table', { id: 'lookup-table' },
      el('thead', {}, el('tr', {}, el('th', {}, 'Backend'), el('th', {}, 'State'),
        el('th', { class: 'num' }, 'Attempts'), el('th', { class: 'num' }, 'Status'), el('th', {}, 'Last outcome'))),
      el('tbody', {}, ...rows));
    out.replaceChildren(head, table);
  }

  // ---- the poll ----

  let timer = null;
  let running = false;
  let again = false;

  async function refresh() {
    clearTimeout(timer);
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      const [state, dead] = await Promise.all([
        getJson('/console/api/state'),
        getJson(`/dead-letters?limit=${DEAD_PAGE}`),
      ]);
      const now = state.now;
      if (adminActions !== state.admin_actions) {
        adminActions = state.admin_actions;
        showTokenState();
      }
      syncRows($('backends').tBodies[0], state.backends, (b) => b.backend, backendRow,
        (tr, b) => updateBackend(tr, b, now));
      $('backends').hidden = state.backends.length === 0;
      $('backends-empty').hidden = state.backends.length > 0;
      setText($('summary'), `${state.unfinished} deliveries unfinished · ${state.ready ? 'accepting writes' :
        'NOT accepting writes (see /readyz)'}`);
      renderDead(dead, now);
      syncRows($('recoveries').tBodies[0], state.recoveries, (r) => r.backend, recoveryRow,
        (tr, r) => updateRecovery(tr, r, now));
      $('recoveries').hidden = state.recoveries.length === 0;
      $('recoveries-empty').hidden = state.recoveries.length > 0;
      await showLookup();
      live(true, `live · updated ${new Date(Date.parse(now)).toLocaleTimeString()}`);
    } catch (e) {
      live(false, `cannot read fanout: ${e.message}; retrying`);
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      refresh();
    } else {
      timer = setTimeout(refresh, POLL_MS);
    }
  }

  function refreshNow() {
    refresh();
  }

  showTokenState();
  refresh();
})();
