// hookrelay's delivery log page. Plain JS, no framework, no build step: it is embedded in the
// binary and served under a strict Content-Security-Policy (no inline script or style).
// Every value from the API is put in the page as text (textContent, createElement), never as
// HTML: receivers' error texts and event data are untrusted.
'use strict';

(() => {
  const TOKEN_KEY = 'hookrelay.token';
  const NAMESPACE_KEY = 'hookrelay.namespace';
  const POLL_MS = 2000;
  const MAX_POLL_MS = 30000;
  // The API returns the 20 most recent attempts.
  const CHART_SLOTS = 20;
  const SVG_NS = 'http://www.w3.org/2000/svg';

  const main = document.getElementById('main');
  const crumbs = document.getElementById('crumbs');
  const forget = document.getElementById('forget');
  const announcer = document.getElementById('announce');

  // Each render bumps this; late answers of an earlier view are dropped.
  let generation = 0;
  // Stops the current view's timers.
  let teardown = () => {};

  // ---- small DOM helpers (text only) -------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else if (value === true) node.setAttribute(key, '');
      else node.setAttribute(key, String(value));
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      // Strings become text nodes: nothing here is parsed as HTML.
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child !== undefined && child !== null) node.append(child);
    }
    return node;
  }

  function announce(text) {
    announcer.textContent = '';
    // A fresh text node so screen readers announce a repeat of the same message too.
    window.setTimeout(() => { announcer.textContent = text; }, 50);
  }

  const dash = '—';
  const show = (v) => (v === undefined || v === null || v === '' ? dash : String(v));

  function when(iso) {
    if (!iso) return dash;
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return el('time', { datetime: iso, title: iso }, d.toLocaleString());
  }

  function percent(rate) {
    if (typeof rate !== 'number') return dash;
    return `${(rate * 100).toFixed(rate === 1 || rate === 0 ? 0 : 1)} %`;
  }

  function badge(text, kind) {
    return el('span', { class: `badge badge-${kind}` }, text);
  }

  function outcomeBadge(outcome) {
    const kind = { Succeeded: 'ok', Failed: 'bad', Retrying: 'warn' }[outcome] || 'neutral';
    return badge(show(outcome), kind);
  }

  const enc = encodeURIComponent;
  const nsHref = (ns) => `#/ns/${enc(ns)}`;
  const webhookHref = (ns, id) => `#/ns/${enc(ns)}/webhooks/${enc(id)}`;
  const eventHref = (ns, name) => `#/ns/${enc(ns)}/events/${enc(name)}`;

  // ---- the API -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const token = () => sessionStorage.getItem(TOKEN_KEY);

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (e) {
      throw new ApiError(0, 'unreachable', `hookrelay could not be reached (${e.message}); check that it runs, then retry.`);
    }
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(response.status, error.code || `http_${response.status}`,
        error.message || `hookrelay answered HTTP ${response.status}.`);
    }
    return data;
  }

  // ---- states ------------------------------------------------------------------------------

  function tokenForm(heading, intro) {
    const input = el('input', {
      id: 'token', name: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false',
      required: true, 'aria-describedby': 'token-help',
    });
    const form = el('form', { class: 'card', id: 'token-form', 'aria-labelledby': 'token-heading' },
      el('h2', { id: 'token-heading' }, heading),
      intro ? el('p', {}, intro) : null,
      el('label', { for: 'token' }, 'Bearer token'),
      input,
      el('p', { id: 'token-help', class: 'help' },
        'A ServiceAccount token for hookrelay\'s audience, e.g. ',
        el('code', {}, 'kubectl create token hookrelay-viewer -n NAMESPACE --audience hookrelay'),
        '. It is kept in this tab only (session storage).'),
      el('button', { type: 'submit' }, 'Use this token'));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      announce('Token saved for this tab.');
      render();
    });
    return form;
  }

  function errorState(error, retry) {
    if (error.status === 401) {
      return el('section', { class: 'state', 'data-state': 'unauthorized', role: 'alert' },
        el('h1', {}, 'Your token was not accepted'),
        el('p', {}, 'hookrelay answered 401: ', error.message),
        el('p', {}, 'The token may be wrong, expired, or made for another audience. Enter another one.'),
        tokenForm('Enter another token'));
    }
    if (error.status === 403) {
      return el('section', { class: 'state', 'data-state': 'forbidden', role: 'alert' },
        el('h1', {}, 'Not allowed'),
        el('p', { class: 'message' }, error.message),
        el('p', {}, 'Ask for a Role that grants this verb on hookrelay.dev resources in the namespace, or enter another token.'),
        tokenForm('Enter another token'));
    }
    return el('section', { class: 'state', 'data-state': 'error', role: 'alert' },
      el('h1', {}, 'hookrelay answered with an error'),
      el('p', { class: 'message' }, error.message),
      el('p', { class: 'help' }, `HTTP ${error.status || 'unreachable'}, ${error.code}`),
      retry ? el('button', { type: 'button', onclick: retry }, 'Retry') : null);
  }

  function loading(what) {
    return el('p', { class: 'state', 'data-state': 'loading', role: 'status' }, `Loading ${what}…`);
  }

  function setCrumbs(parts) {
    crumbs.replaceChildren();
    const list = el('ol', {});
    parts.forEach(([label, href], i) => {
      const last = i === parts.length - 1;
      list.append(el('li', {}, last ? el('span', { 'aria-current': 'page' }, label) : el('a', { href }, label)));
    });
    crumbs.append(list);
  }

  // ---- views -------------------------------------------------------------------------------

  async function homeView(gen) {
    setCrumbs([['Start', '#/']]);
    main.replaceChildren(el('h1', {}, 'Delivery log'));
    if (!token()) {
      main.append(el('p', { class: 'state', 'data-state': 'empty' },
        'Enter a token to see the Webhooks of a namespace and their deliveries.'),
      tokenForm('Sign in with a token'));
      return;
    }
    main.append(loading('the watched namespaces'));
    // In --watch-namespace mode the person picks from the watched list; in all-namespaces mode (or
    // against a hookrelay without /api/namespaces) they type one.
    let watched = null;
    let problem = null;
    try {
      const reply = await api('GET', '/api/namespaces');
      if (reply && !reply.all_namespaces && Array.isArray(reply.namespaces)) watched = reply.namespaces;
    } catch (e) {
      if (e.status === 401) problem = e;
    }
    if (gen !== generation) return;
    main.replaceChildren(el('h1', {}, 'Delivery log'));
    if (problem) {
      main.append(errorState(problem));
      return;
    }
    const remembered = sessionStorage.getItem(NAMESPACE_KEY) || '';
    let field;
    if (watched && watched.length) {
      field = el('select', { id: 'namespace', name: 'namespace', required: true },
        watched.map((ns) => el('option', { value: ns, selected: ns === remembered }, ns)));
    } else {
      field = el('input', {
        id: 'namespace', name: 'namespace', type: 'text', required: true, autocomplete: 'off',
        pattern: '[a-z0-9]([-a-z0-9]*[a-z0-9])?', maxlength: 63, value: remembered, spellcheck: 'false',
      });
    }
    const form = el('form', { class: 'card', id: 'namespace-form' },
      el('h2', {}, 'Namespace'),
      el('label', { for: 'namespace' }, watched ? 'Watched namespace' : 'Namespace of the Webhooks'),
      field,
      el('button', { type: 'submit' }, 'Show Webhooks'));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const ns = field.value.trim();
      if (!ns) return;
      sessionStorage.setItem(NAMESPACE_KEY, ns);
      location.hash = nsHref(ns);
    });
    main.append(form, tokenForm('Use another token'));
  }

  async function listView(gen, ns) {
    setCrumbs([['Start', '#/'], [ns, nsHref(ns)]]);
    sessionStorage.setItem(NAMESPACE_KEY, ns);
    main.replaceChildren(el('h1', {}, `Webhooks in ${ns}`), loading('Webhooks'));
    let reply;
    try {
      reply = await api('GET', `/api/webhooks?namespace=${enc(ns)}`);
    } catch (e) {
      if (gen !== generation) return;
      main.replaceChildren(el('h1', {}, `Webhooks in ${ns}`), errorState(e, render));
      return;
    }
    if (gen !== generation) return;
    const webhooks = (reply && reply.webhooks) || [];
    main.replaceChildren(el('h1', {}, `Webhooks in ${ns}`));
    if (!webhooks.length) {
      main.append(el('p', { class: 'state', 'data-state': 'empty' },
        `No Webhooks in namespace ${ns}. Create one with kubectl (see the README) or POST /api/webhooks.`));
      return;
    }
    const rows = webhooks.map((w) => {
      const target = w.url || (w.service_ref ? `Service ${w.service_ref.name}:${w.service_ref.port}` : dash);
      const ready = w.ready === true ? badge('Ready', 'ok')
        : w.ready === false ? badge(`Not ready: ${show(w.ready_reason)}`, 'bad') : badge('Unknown', 'neutral');
      const degraded = w.degraded === true ? badge(`Degraded${w.degraded_reason ? `: ${w.degraded_reason}` : ''}`, 'warn')
        : w.degraded === false ? 'No' : dash;
      const state = w.suspended ? badge('Suspended', 'bad') : w.paused ? badge('Paused', 'warn') : 'Active';
      return el('tr', { 'data-webhook': w.id },
        el('th', { scope: 'row' }, el('a', { href: webhookHref(ns, w.id) }, w.id)),
        el('td', { class: 'wrap' }, target),
        el('td', {}, (w.events || []).join(', ')),
        el('td', {}, ready),
        el('td', {}, degraded),
        el('td', {}, state),
        el('td', {}, when(w.last_delivery_at)),
        el('td', { class: 'num' }, percent(w.success_rate)),
        el('td', { class: 'num' }, show(w.in_flight)));
    });
    main.append(scrollTable('Webhooks', ['Name', 'URL or Service', 'Events', 'Ready', 'Degraded',
      'State', 'Last delivery', 'Success rate', 'In flight'], rows, 'webhooks'));
  }

  function scrollTable(label, headings, rows, id) {
    // Focusable so that keyboard users can scroll it sideways on a narrow screen.
    return el('div', { class: 'table-scroll', role: 'region', 'aria-label': label, tabindex: 0 },
      el('table', { id },
        el('thead', {}, el('tr', {}, headings.map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, rows)));
  }

  async function webhookView(gen, ns, id) {
    setCrumbs([['Start', '#/'], [ns, nsHref(ns)], [id, webhookHref(ns, id)]]);
    main.replaceChildren(el('h1', {}, id), loading('the Webhook'));
    const base = `/api/webhooks/${enc(id)}`;
    const q = `namespace=${enc(ns)}`;
    let webhook;
    try {
      webhook = await api('GET', `${base}?${q}`);
    } catch (e) {
      if (gen !== generation) return;
      main.replaceChildren(el('h1', {}, id), errorState(e, render));
      return;
    }
    if (gen !== generation) return;

    const result = el('div', { id: 'action-result', role: 'status', 'aria-live': 'polite' });
    const summary = el('dl', { class: 'facts', id: 'webhook-facts' });
    const stats = el('dl', { class: 'facts', id: 'stats' });
    const chart = el('figure', { class: 'chart', id: 'chart' });
    const deliveries = el('div', { id: 'deliveries' }, loading('deliveries'));
    const liveNote = el('p', { class: 'help', id: 'live-note' }, 'Updates every 2 seconds.');
    let searching = null;
    // Counts actions started and finished (see the poll).
    let actions = 0;

    function showResult(kind, ...text) {
      result.replaceChildren(el('p', { class: `notice notice-${kind}`, 'data-kind': kind }, ...text));
    }

    function fillSummary(w) {
      webhook = w;
      summary.replaceChildren();
      const fact = (term, value) => summary.append(el('div', {}, el('dt', {}, term), el('dd', {}, value)));
      fact('Target', w.url || (w.service_ref ? `Service ${w.service_ref.name}:${w.service_ref.port}${w.service_ref.path || '/'}` : dash));
      fact('Events', (w.events || []).join(', '));
      fact('Ready', w.ready === true ? badge('Ready', 'ok')
        : el('span', {}, badge(`Not ready: ${show(w.ready_reason)}`, 'bad'), w.ready_message ? el('span', { class: 'help' }, ` ${w.ready_message}`) : ''));
      fact('State', w.suspended ? badge(`Suspended since ${show(w.suspended.since)}`, 'bad') : w.paused ? badge('Paused', 'warn') : 'Active');
      fact('Degraded', w.degraded ? badge(`Yes: ${show(w.degraded_message || w.degraded_reason)}`, 'warn') : 'No');
      fact('In flight', show(w.in_flight));
      if (w.description) fact('Description', w.description);
      if (w.filter) fact('Filter', el('code', {}, w.filter));
      pauseButton.textContent = w.paused ? 'Resume deliveries' : 'Pause deliveries';
      pauseButton.setAttribute('aria-pressed', w.paused ? 'true' : 'false');
      liftButton.hidden = !w.suspended;
    }

    async function act(button, busyText, work) {
      const label = button.textContent;
      button.disabled = true;
      button.textContent = busyText;
      actions += 1;
      try {
        await work();
        actions += 1;
      } catch (e) {
        if (e.status === 401 || e.status === 403) {
          result.replaceChildren(errorState(e));
        } else {
          showResult('bad', e.message);
        }
      } finally {
        button.disabled = false;
        if (button.textContent === busyText) button.textContent = label;
      }
    }

    function attemptText(verb, reply) {
      const parts = [`${verb} ${reply.delivery_id}: `, reply.success ? 'succeeded' : 'failed'];
      if (reply.status_code) parts.push(`, HTTP ${reply.status_code}`);
      if (typeof reply.response_time_ms === 'number') parts.push(`, ${reply.response_time_ms} ms`);
      if (reply.error) parts.push(`: ${reply.error}`);
      return parts.join('');
    }

    const testButton = el('button', { type: 'button', id: 'send-test' }, 'Send a test delivery');
    testButton.addEventListener('click', () => act(testButton, 'Sending…', async () => {
      const reply = await api('POST', `${base}/test?${q}`);
      showResult(reply.success ? 'ok' : 'bad', attemptText('Test delivery', reply));
      poll.now();
    }));
    const pauseButton = el('button', { type: 'button', id: 'pause', class: 'secondary' }, 'Pause deliveries');
    pauseButton.addEventListener('click', () => act(pauseButton, 'Saving…', async () => {
      const paused = !webhook.paused;
      // PUT takes the fields it is given and leaves the others as they are.
      const updated = await api('PUT', `${base}?${q}`, { paused });
      fillSummary(updated);
      showResult('ok', paused ? 'Paused: deliveries are held, not dropped.' : 'Resumed: held deliveries go out now.');
    }));
    const liftButton = el('button', { type: 'button', id: 'lift-suspension', class: 'secondary', hidden: true }, 'Lift the suspension');
    liftButton.addEventListener('click', () => act(liftButton, 'Lifting…', async () => {
      fillSummary(await api('POST', `${base}/resume?${q}`));
      showResult('ok', 'The suspension is lifted: deliveries are attempted again.');
    }));

    const since = el('input', { id: 'recover-since', name: 'since', type: 'datetime-local', required: true, step: 1 });
    since.value = localInputValue(new Date(Date.now() - 3600 * 1000));
    const recoverForm = el('form', { class: 'inline', id: 'recover-form' },
      el('label', { for: 'recover-since' }, 'Send again what failed since (your local time)'),
      since,
      el('button', { type: 'submit', class: 'secondary' }, 'Recover'));
    recoverForm.addEventListener('submit', (e) => {
      e.preventDefault();
      const button = recoverForm.querySelector('button');
      const at = new Date(since.value);
      if (Number.isNaN(at.getTime())) { showResult('bad', 'Enter a date and time.'); return; }
      act(button, 'Queuing…', async () => {
        const reply = await api('POST', `${base}/recover?${q}&since=${enc(at.toISOString())}`);
        showResult('ok', `Queued ${show(reply.queued)} failed deliveries since ${at.toISOString()}${reply.truncated ? ' (more remain: recover again)' : ''}.`);
        poll.now();
      });
    });

    const searchKind = el('select', { id: 'search-kind', name: 'kind' },
      el('option', { value: 'document_id' }, 'Document id'),
      el('option', { value: 'delivery_id' }, 'Delivery id'));
    const searchText = el('input', { id: 'search-text', name: 'q', type: 'search', required: true, autocomplete: 'off', spellcheck: 'false', maxlength: 253 });
    const clearButton = el('button', { type: 'button', class: 'secondary', id: 'search-clear', hidden: true }, 'Show recent deliveries');
    const searchForm = el('form', { class: 'inline', id: 'search-form', role: 'search' },
      el('label', { for: 'search-kind' }, 'Search by'), searchKind,
      el('label', { for: 'search-text', class: 'visually-hidden' }, 'Value to search for'), searchText,
      el('button', { type: 'submit', class: 'secondary' }, 'Search'), clearButton);
    searchForm.addEventListener('submit', (e) => {
      e.preventDefault();
      const value = searchText.value.trim();
      if (!value) return;
      searching = { kind: searchKind.value, value };
      clearButton.hidden = false;
      liveNote.textContent = 'Showing search results; live updates are off.';
      deliveries.replaceChildren(loading('search results'));
      api('GET', `${base}/deliveries?${q}&${searching.kind}=${enc(value)}`).then((reply) => {
        if (gen !== generation || !searching) return;
        drawDeliveries(reply, true);
        announce(`${(reply.deliveries || []).length} deliveries found.`);
      }, (err) => {
        if (gen !== generation) return;
        deliveries.replaceChildren(errorState(err));
      });
    });
    clearButton.addEventListener('click', () => {
      searching = null;
      clearButton.hidden = true;
      liveNote.textContent = 'Updates every 2 seconds.';
      poll.now();
      searchText.focus();
    });

    function drawDeliveries(reply, isSearch) {
      const list = (reply && reply.deliveries) || [];
      // Keep the keyboard where it was across a refresh.
      const focused = document.activeElement && document.activeElement.dataset
        ? document.activeElement.dataset.focusKey : undefined;
      if (!list.length) {
        deliveries.replaceChildren(el('p', { class: 'state', 'data-state': 'empty' },
          isSearch ? 'Nothing retained matches. Events of direct ingest are not retained.'
            : 'No deliveries yet. Send a test delivery to see one.'));
      } else {
        const rows = list.map((d) => deliveryRow(d));
        deliveries.replaceChildren(scrollTable(isSearch ? 'Search results' : 'Recent deliveries',
          ['Time', 'Event', 'Source', 'Attempt', 'Outcome', 'HTTP status', 'Response time', 'Error', 'Delivery id', 'Action'],
          rows, 'delivery-table'));
        if (isSearch && reply.truncated) deliveries.append(el('p', { class: 'help' }, 'A bound cut the search short: more may match.'));
      }
      if (focused) {
        const again = deliveries.querySelector(`[data-focus-key="${CSS.escape(focused)}"]`);
        if (again) again.focus();
      }
      if (!isSearch) {
        drawStats(reply.stats);
        drawChart(list);
      }
    }

    function deliveryRow(d) {
      // The DocumentEvent this attempt delivered; null for direct, JetStream, test and redelivery.
      const eventName = d.document_event;
      const source = eventName ? el('a', { href: eventHref(ns, eventName) }, d.source || eventName) : show(d.source);
      let action = null;
      // Only a stored event can be sent again (a test or direct-ingest delivery has none).
      if (d.outcome === 'Failed' && d.id && eventName) {
        action = el('button', { type: 'button', class: 'small', 'data-focus-key': `redeliver-${d.id}`, 'aria-label': `Redeliver ${d.id}` }, 'Redeliver');
        action.addEventListener('click', () => act(action, 'Sending…', async () => {
          const reply = await api('POST', `${base}/deliveries/${enc(d.id)}/redeliver?${q}`);
          showResult(reply.success ? 'ok' : 'bad', attemptText('Redelivery of', reply));
          poll.now();
        }));
      }
      return el('tr', { 'data-delivery-id': d.id, 'data-outcome': d.outcome },
        el('td', {}, when(d.created_at)),
        el('td', {}, show(d.event)),
        el('td', {}, source),
        el('td', { class: 'num' }, show(d.attempt)),
        el('td', {}, outcomeBadge(d.outcome)),
        el('td', { class: 'num' }, show(d.status_code)),
        el('td', { class: 'num' }, typeof d.response_time_ms === 'number' ? `${d.response_time_ms} ms` : dash),
        el('td', { class: 'wrap error-text' }, show(d.error)),
        el('td', {}, el('code', {}, show(d.id))),
        el('td', {}, action));
    }

    function drawStats(s) {
      stats.replaceChildren();
      if (!s) { stats.append(el('div', {}, el('dt', {}, 'Stats'), el('dd', {}, 'none yet'))); return; }
      const fact = (term, value) => stats.append(el('div', {}, el('dt', {}, term), el('dd', {}, value)));
      fact('Succeeded', show(s.succeeded));
      fact('Failed', show(s.failed));
      fact('Failures in a row', show(s.consecutiveFailures));
      fact('Last success', when(s.lastSuccessTime));
      fact('Last failure', when(s.lastFailureTime));
      if (s.failingSince) fact('Failing since', when(s.failingSince));
    }

    function drawChart(list) {
      // Oldest on the left; bar height is the response time, colour the outcome.
      const recent = list.slice(0, CHART_SLOTS).reverse();
      const width = 320;
      const height = 80;
      const gap = 2;
      // Fixed slots: a bar is as wide with 2 deliveries as with 20.
      const slot = width / CHART_SLOTS;
      const slowest = Math.max(1, ...recent.map((d) => d.response_time_ms || 0));
      const ok = recent.filter((d) => d.outcome === 'Succeeded').length;
      const label = recent.length
        ? `${recent.length} recent deliveries, ${ok} succeeded, ${recent.length - ok} did not; slowest ${slowest} ms`
        : 'No deliveries yet';
      const chartSvg = svg('svg', { viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-labelledby': 'chart-title', class: 'chart-svg' },
        svg('title', { id: 'chart-title' }, label),
        svg('line', { x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5, class: 'axis' }));
      recent.forEach((d, i) => {
        const h = Math.max(3, ((d.response_time_ms || 0) / slowest) * (height - 6));
        const kind = d.outcome === 'Succeeded' ? 'ok' : d.outcome === 'Retrying' ? 'warn' : 'bad';
        const bar = svg('rect', {
          x: (i * slot + gap / 2).toFixed(1), y: (height - h).toFixed(1),
          width: Math.max(1, slot - gap).toFixed(1), height: h.toFixed(1), class: `bar bar-${kind}`,
        }, svg('title', {}, `${show(d.outcome)}, ${show(d.response_time_ms)} ms, ${show(d.created_at)}`));
        chartSvg.append(bar);
      });
      chart.replaceChildren(chartSvg, el('figcaption', {}, label,
        el('span', { class: 'legend' }, ' ', badge('succeeded', 'ok'), ' ', badge('retrying', 'warn'), ' ', badge('failed', 'bad'))));
    }

    // Polls every 2 s; backs off to 30 s while the API fails; not while the tab is hidden.
    const poll = (() => {
      let timer = null;
      let delay = POLL_MS;
      let stopped = false;
      async function tick() {
        timer = null;
        if (stopped) return;
        if (document.hidden) { schedule(); return; }
        try {
          // The Webhook too: Ready, paused and suspended change under the person's eyes.
          const actionsBefore = actions;
          const [w, reply] = await Promise.all([api('GET', `${base}?${q}`), api('GET', `${base}/deliveries?${q}`)]);
          if (stopped || gen !== generation) return;
          // A read that overlapped an action may predate it: the action's own answer wins.
          if (actionsBefore === actions) fillSummary(w);
          if (searching) { schedule(); return; }
          drawDeliveries(reply, false);
          delay = POLL_MS;
          liveNote.textContent = 'Updates every 2 seconds.';
          liveNote.removeAttribute('data-backoff');
        } catch (e) {
          if (stopped || gen !== generation) return;
          if (e.status === 401 || e.status === 403) {
            deliveries.replaceChildren(errorState(e));
            stop();
            return;
          }
          delay = Math.min(delay * 2, MAX_POLL_MS);
          liveNote.textContent = `Could not refresh (${e.message}); retrying in ${Math.round(delay / 1000)} s.`;
          liveNote.setAttribute('data-backoff', String(delay));
        }
        schedule();
      }
      function schedule() {
        if (!stopped && timer === null) timer = window.setTimeout(tick, delay);
      }
      function stop() {
        stopped = true;
        if (timer !== null) window.clearTimeout(timer);
        timer = null;
      }
      function now() {
        if (stopped) return;
        if (timer !== null) window.clearTimeout(timer);
        timer = null;
        tick();
      }
      const onVisible = () => { if (!document.hidden) now(); };
      document.addEventListener('visibilitychange', onVisible);
      return {
        now,
        stop() { stop(); document.removeEventListener('visibilitychange', onVisible); },
      };
    })();
    teardown = poll.stop;

    main.replaceChildren(
      el('h1', {}, `Webhook ${id}`),
      summary,
      el('div', { class: 'actions', role: 'group', 'aria-label': 'Actions' }, testButton, pauseButton, liftButton),
      recoverForm,
      result,
      el('h2', {}, 'Delivery stats'),
      stats,
      chart,
      el('h2', {}, 'Deliveries'),
      searchForm,
      liveNote,
      deliveries);
    fillSummary(webhook);
    poll.now();
  }

  async function eventView(gen, ns, name) {
    setCrumbs([['Start', '#/'], [ns, nsHref(ns)], [`event ${name}`, eventHref(ns, name)]]);
    main.replaceChildren(el('h1', {}, `Event ${name}`), loading('the event'));
    let ev;
    try {
      ev = await api('GET', `/api/documentevents/${enc(name)}?namespace=${enc(ns)}`);
    } catch (e) {
      if (gen !== generation) return;
      if (e.status === 404) {
        main.replaceChildren(el('h1', {}, `Event ${name}`),
          el('section', { class: 'state', 'data-state': 'empty' },
            el('p', {}, 'This event is not retained: it was removed after --event-retention, or it came through direct ingest, which keeps no DocumentEvent.'),
            el('p', { class: 'help' }, e.message)));
        return;
      }
      main.replaceChildren(el('h1', {}, `Event ${name}`), errorState(e, render));
      return;
    }
    if (gen !== generation) return;
    const facts = el('dl', { class: 'facts' });
    const fact = (term, value) => facts.append(el('div', {}, el('dt', {}, term), el('dd', {}, value)));
    fact('Event', show(ev.event));
    fact('Phase', show(ev.phase));
    fact('Timestamp', when(ev.timestamp));
    fact('Source', show(ev.source));
    const rows = (ev.deliveries || []).map((d) => el('tr', {},
      el('th', { scope: 'row' }, el('a', { href: webhookHref(ns, d.webhook) }, show(d.webhook))),
      el('td', {}, el('code', {}, show(d.delivery_id))),
      el('td', { class: 'num' }, show(d.attempts)),
      el('td', {}, outcomeBadge(d.outcome)),
      el('td', { class: 'num' }, show(d.http_status)),
      el('td', { class: 'num' }, typeof d.response_time_ms === 'number' ? `${d.response_time_ms} ms` : dash),
      el('td', { class: 'wrap error-text' }, show(d.error)),
      el('td', {}, when(d.at))));
    main.replaceChildren(el('h1', {}, `Event ${name}`), facts,
      el('h2', {}, 'Deliveries'),
      rows.length ? scrollTable('Deliveries of this event', ['Webhook', 'Delivery id', 'Attempts', 'Outcome', 'HTTP status', 'Response time', 'Error', 'At'], rows, 'event-deliveries')
        : el('p', { class: 'state', 'data-state': 'empty' }, 'No Webhook matched this event.'),
      el('h2', {}, 'Data'),
      el('pre', { class: 'data', tabindex: 0 }, JSON.stringify(ev.data, null, 2)));
  }

  function localInputValue(date) {
    const pad = (n) => String(n).padStart(2, '0');
    return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
  }

  // ---- routing -----------------------------------------------------------------------------

  function route() {
    const parts = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean);
    let decoded;
    try { decoded = parts.map(decodeURIComponent); } catch (_) { decoded = []; }
    return decoded;
  }

  function render() {
    teardown();
    teardown = () => {};
    generation += 1;
    const gen = generation;
    forget.hidden = !token();
    const [first, ns, kind, name] = route();
    let view;
    if (first !== 'ns' || !ns || !token()) view = homeView(gen);
    else if (!kind) view = listView(gen, ns);
    else if (kind === 'webhooks' && name) view = webhookView(gen, ns, name);
    else if (kind === 'events' && name) view = eventView(gen, ns, name);
    else view = listView(gen, ns);
    view.catch((e) => {
      main.replaceChildren(errorState(e instanceof ApiError ? e : new ApiError(0, 'page_error', String(e)), render));
    });
  }

  forget.addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    announce('Token forgotten.');
    location.hash = '#/';
    render();
  });

  window.addEventListener('hashchange', () => {
    render();
    main.focus();
  });
  render();
})();
