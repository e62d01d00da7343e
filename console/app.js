// contextd console: Admin > Events, Admin > Profiles and the agent's
// customer context card. Plain browser JavaScript, no dependencies, no build
// step; it talks only to contextd's HTTP API on the same origin.
//
// All data is put into the page with textContent / createTextNode /
// setAttribute, never with innerHTML.
(function () {
  'use strict';

  var TOKEN_KEY = 'contextd.api_token';
  var POLL_MS = 2000;           // customer card refresh
  var SETTINGS_POLL_MS = 400;   // after a save, until the settings apply
  var SETTINGS_TIMEOUT_MS = 15000;
  var FLASH_MS = 4000;          // "Updated just now"
  var FIELDS_SHOWN = 10;        // profile fields before "View all"

  // ---------------------------------------------------------------- helpers

  function $(id) { return document.getElementById(id); }

  // el('div', {class: 'x', 'data-id': v}, child, 'text', ...) — strings become
  // text nodes, so data is never parsed as HTML.
  function el(tag, attrs) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === undefined || v === null || v === false) return;
        if (k === 'text') node.textContent = String(v);
        else if (k === 'hidden') node.hidden = !!v;
        else if (k === 'checked') node.checked = !!v;
        else if (k === 'onclick') node.addEventListener('click', v);
        else if (k === 'onchange') node.addEventListener('change', v);
        else node.setAttribute(k, v === true ? '' : String(v));
      });
    }
    for (var i = 2; i < arguments.length; i++) append(node, arguments[i]);
    return node;
  }

  function append(node, child) {
    if (child === undefined || child === null || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(node, c); }); return; }
    node.appendChild(typeof child === 'object' ? child : document.createTextNode(String(child)));
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function pad(n) { return n < 10 ? '0' + n : String(n); }

  function parseTime(s) {
    if (!s) return null;
    var t = Date.parse(s);
    return isNaN(t) ? null : new Date(t);
  }

  function clockTime(d) { return pad(d.getHours()) + ':' + pad(d.getMinutes()) + ':' + pad(d.getSeconds()); }

  function absTime(s) {
    var d = parseTime(s);
    if (!d) return s ? String(s) : '—';
    return d.getFullYear() + '-' + pad(d.getMonth() + 1) + '-' + pad(d.getDate()) + ' ' + clockTime(d);
  }

  function relTime(s) {
    var d = parseTime(s);
    if (!d) return '';
    var secs = Math.round((Date.now() - d.getTime()) / 1000);
    var future = secs < 0;
    var a = Math.abs(secs);
    var text;
    if (a < 45) return future ? 'in a moment' : 'just now';
    if (a < 90) text = '1 minute';
    else if (a < 3600) text = Math.round(a / 60) + ' minutes';
    else if (a < 5400) text = '1 hour';
    else if (a < 86400) text = Math.round(a / 3600) + ' hours';
    else if (a < 172800) text = '1 day';
    else if (a < 86400 * 45) text = Math.round(a / 86400) + ' days';
    else if (a < 86400 * 365) text = Math.round(a / (86400 * 30)) + ' months';
    else text = Math.round(a / (86400 * 365)) + ' years';
    return future ? 'in ' + text : text + ' ago';
  }

  // <time> showing "5 minutes ago · 2026-11-20 10:00:00"; the relative part
  // is refreshed by refreshRelativeTimes().
  function timeEl(s, testid) {
    var t = el('time', { datetime: s || '', title: s || '', 'data-rel': s || '', 'data-testid': testid });
    fillTime(t);
    return t;
  }

  function fillTime(t) {
    var s = t.getAttribute('data-rel');
    var rel = relTime(s);
    t.textContent = rel ? rel + ' · ' + absTime(s) : absTime(s);
  }

  function refreshRelativeTimes() {
    Array.prototype.forEach.call(document.querySelectorAll('time[data-rel]'), fillTime);
  }

  function setStatus(node, text, kind) {
    node.textContent = text || '';
    node.className = 'status' + (kind ? ' ' + kind : '');
    node.setAttribute('data-kind', kind || '');
  }

  function typeKey(source, type) { return source + '\u0000' + type; }

  function humanize(s) {
    var t = String(s || '').replace(/_/g, ' ').trim();
    return t ? t.charAt(0).toUpperCase() + t.slice(1) : '';
  }

  function isPlainObject(v) { return v !== null && typeof v === 'object' && !Array.isArray(v); }

  function scalarText(v) {
    if (v === null || v === undefined) return '—';
    if (typeof v === 'object') return JSON.stringify(v);
    return String(v);
  }

  // {a: {b: 1}, c: [1, 2]} -> [["a.b", "1"], ["c", "1, 2"]]
  function flatten(obj, prefix, out) {
    out = out || [];
    prefix = prefix || '';
    Object.keys(obj || {}).forEach(function (k) {
      var v = obj[k];
      var key = prefix + k;
      if (isPlainObject(v) && Object.keys(v).length) flatten(v, key + '.', out);
      else if (Array.isArray(v) && v.every(function (x) { return x === null || typeof x !== 'object'; })) out.push([key, v.map(scalarText).join(', ')]);
      else out.push([key, scalarText(v)]);
    });
    return out;
  }

  function getPath(obj, path) {
    var parts = path.split('.');
    var v = obj;
    for (var i = 0; i < parts.length; i++) {
      if (!isPlainObject(v)) return undefined;
      v = v[parts[i]];
    }
    return v;
  }

  // The first of the paths holding a non-empty scalar, as text.
  function pick(obj) {
    for (var i = 1; i < arguments.length; i++) {
      var v = getPath(obj, arguments[i]);
      if (v !== undefined && v !== null && v !== '' && typeof v !== 'object') return String(v);
    }
    return '';
  }

  // ------------------------------------------------------------------- API

  function HttpError(status, message, body) {
    this.name = 'HttpError';
    this.status = status;
    this.message = message;
    this.body = body;
  }
  HttpError.prototype = Object.create(Error.prototype);

  function getToken() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ''; } catch (e) { return ''; }
  }

  function api(method, path, body) {
    var headers = { Accept: 'application/json' };
    var token = getToken();
    if (token) headers.Authorization = 'Bearer ' + token;
    var init = { method: method, headers: headers, cache: 'no-store', credentials: 'same-origin' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (res) {
      return res.text().then(function (text) {
        var data = null;
        if (text) { try { data = JSON.parse(text); } catch (e) { data = null; } }
        if (res.status === 401) {
          showTokenPrompt();
          throw new HttpError(401, 'The API needs a token', data);
        }
        if (!res.ok) {
          var title = data && data.errors && data.errors[0] && data.errors[0].title;
          throw new HttpError(res.status, title || ('HTTP ' + res.status), data);
        }
        return data;
      });
    }, function (err) {
      throw new HttpError(0, 'cannot reach contextd (' + (err && err.message || err) + ')', null);
    });
  }

  function errText(e) { return (e && e.message) || String(e); }

  function userPath(userId, rest) { return '/api/v2/users/' + encodeURIComponent(userId) + rest; }

  // ----------------------------------------------------------- token prompt

  function showTokenPrompt() {
    var p = $('token-prompt');
    if (!p.hidden) return;
    p.hidden = false;
    $('token-input').value = '';
    $('token-input').focus();
  }

  $('token-form').addEventListener('submit', function (ev) {
    ev.preventDefault();
    var t = $('token-input').value.trim();
    if (!t) return;
    try { sessionStorage.setItem(TOKEN_KEY, t); } catch (e) { /* private mode: ignore */ }
    $('token-prompt').hidden = true;
    route();
  });

  // --------------------------------------------------------------- routing

  var ROUTES = ['events', 'profiles', 'customer'];

  function parseHash() {
    var h = location.hash.replace(/^#\/?/, '');
    if (h.indexOf('customer/') === 0) {
      var raw = h.slice('customer/'.length);
      var id;
      try { id = decodeURIComponent(raw); } catch (e) { id = raw; }
      return { name: 'customer', userId: id || null };
    }
    if (h === 'customer') return { name: 'customer', userId: null };
    if (h === 'profiles') return { name: 'profiles' };
    return { name: 'events' };
  }

  function route() {
    var r = parseHash();
    ROUTES.forEach(function (name) {
      var on = name === r.name;
      $('view-' + name).hidden = !on;
      var tab = $('nav-' + name);
      tab.setAttribute('aria-selected', on ? 'true' : 'false');
      tab.tabIndex = on ? 0 : -1;
    });
    document.body.setAttribute('data-route', r.name);
    if (r.name !== 'customer') stopCustomer();
    if (r.name === 'events') loadEvents();
    else if (r.name === 'profiles') loadProfiles();
    else showCustomer(r.userId);
  }

  function go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  window.addEventListener('hashchange', route);

  Array.prototype.forEach.call(document.querySelectorAll('#nav-events, #nav-profiles, #nav-customer'), function (b) {
    b.addEventListener('click', function () {
      var name = b.getAttribute('data-route');
      if (name === 'customer' && cust.userId) go('#/customer/' + encodeURIComponent(cust.userId));
      else go('#/' + name);
    });
  });

  // Arrow keys move between tabs of a tablist (WAI-ARIA tabs pattern).
  Array.prototype.forEach.call(document.querySelectorAll('[role=tablist]'), function (list) {
    list.addEventListener('keydown', function (ev) {
      var tabs = Array.prototype.slice.call(list.querySelectorAll('[role=tab]'));
      var i = tabs.indexOf(document.activeElement);
      if (i < 0) return;
      var j = null;
      if (ev.key === 'ArrowRight') j = (i + 1) % tabs.length;
      else if (ev.key === 'ArrowLeft') j = (i - 1 + tabs.length) % tabs.length;
      else if (ev.key === 'Home') j = 0;
      else if (ev.key === 'End') j = tabs.length - 1;
      if (j === null) return;
      ev.preventDefault();
      tabs[j].focus();
      tabs[j].click();
    });
  });

  // ------------------------------------------------------------ visibility

  function canonicalSettings(s) {
    s = s || {};
    function list(v) {
      var seen = {};
      (Array.isArray(v) ? v : []).forEach(function (t) { if (t) seen[typeKey(String(t.source), String(t.type))] = 1; });
      return Object.keys(seen).sort();
    }
    return JSON.stringify({
      z: !!s.zendesk_events, e: !!s.events_api, p: !!s.profiles_api,
      ev: list(s.shown_event_types), pr: list(s.shown_profile_types),
    });
  }

  // PUT the settings, then poll until GET answers the same settings.
  function saveSettings(settings, statusNode) {
    setStatus(statusNode, 'Saving…', 'busy');
    return api('PUT', '/api/admin/visibility', settings).then(function () {
      setStatus(statusNode, 'Saved — waiting for it to take effect…', 'busy');
      var want = canonicalSettings(settings);
      var deadline = Date.now() + SETTINGS_TIMEOUT_MS;
      return new Promise(function (resolve, reject) {
        function check() {
          api('GET', '/api/admin/visibility').then(function (got) {
            if (canonicalSettings(got) === want) { resolve(new Date()); return; }
            next();
          }, function (e) {
            if (e.status === 401) { reject(e); return; }
            next();
          });
        }
        function next() {
          if (Date.now() > deadline) {
            reject(new Error('Saved, but the new settings were not in effect after ' + Math.round(SETTINGS_TIMEOUT_MS / 1000) + ' s. Is contextd processing its input?'));
            return;
          }
          setTimeout(check, SETTINGS_POLL_MS);
        }
        check();
      });
    });
  }

  function typeRef(t) { return { source: String(t.source), type: String(t.type) }; }

  // Catalog rows plus the listed types that have not been seen yet (so they
  // can be unticked), each with `checked` from the settings.
  function typeRows(catalog, shownList) {
    var listed = {};
    (shownList || []).forEach(function (t) { listed[typeKey(t.source, t.type)] = true; });
    var rows = [];
    var have = {};
    (catalog || []).forEach(function (t) {
      var k = typeKey(t.source, t.type);
      have[k] = true;
      rows.push({ source: t.source, type: t.type, count: t.count, last_seen: t.last_seen, checked: !!listed[k] });
    });
    (shownList || []).forEach(function (t) {
      var k = typeKey(t.source, t.type);
      if (!have[k]) { have[k] = true; rows.push({ source: t.source, type: t.type, count: 0, last_seen: null, checked: true }); }
    });
    rows.sort(function (a, b) {
      return a.source < b.source ? -1 : a.source > b.source ? 1 : a.type < b.type ? -1 : a.type > b.type ? 1 : 0;
    });
    return rows;
  }

  var ZENDESK_TYPE_HINTS = {
    answers_suggested: 'Articles suggested to the user while creating a request',
    article_instant_search_result_clicked: 'Article clicked in the help center instant search results',
    article_search_result_clicked: 'Article clicked in the help center search results',
    article_viewed: 'Help center article viewed',
    help_center_searched: 'Help center searched from the search bar',
    suggested_article_clicked: 'Suggested article clicked',
    identity_created: 'Identifier added to the user',
    identity_changed: 'Identifier of the user changed',
    name_changed: 'Name of the user changed',
    organization_added: 'User added to an organization',
    organization_removed: 'User removed from an organization',
    user_merged: 'User merged with another user',
    page_view: 'Page viewed (SDK)',
    ticket_requested: 'Support ticket requested',
  };

  var rowSeq = 0;

  // A table of types with a Show checkbox each. kind: 'event' | 'profile'.
  function renderTypeTable(container, rows, opts) {
    clear(container);
    if (!rows.length) {
      container.appendChild(el('p', { class: 'empty', 'data-testid': opts.testid + '-empty', text: opts.empty }));
      return;
    }
    var head = el('tr', null,
      el('th', { scope: 'col', class: 'col-show', text: 'Show' }),
      opts.withSource ? el('th', { scope: 'col', text: 'Source' }) : null,
      el('th', { scope: 'col', text: opts.typeHeading }),
      el('th', { scope: 'col', class: 'num', text: 'Count' }),
      el('th', { scope: 'col', text: 'Last seen' }));
    var body = el('tbody');
    rows.forEach(function (r) {
      var id = opts.kind + '-show-' + (++rowSeq);
      var hint = opts.hints && opts.hints[r.type];
      var box = el('input', {
        type: 'checkbox', id: id, class: 'show-box', 'data-testid': 'show-' + opts.kind,
        'data-source': r.source, 'data-type': r.type, checked: r.checked,
      });
      box.addEventListener('change', opts.onChange);
      body.appendChild(el('tr', { 'data-testid': opts.kind + '-type-row', 'data-source': r.source, 'data-type': r.type },
        el('td', { class: 'col-show' }, box),
        opts.withSource ? el('td', { class: 'source' }, el('code', { text: r.source })) : null,
        el('td', null,
          el('label', { for: id }, el('code', { class: 'type-name', text: r.type })),
          hint ? el('span', { class: 'sub', text: hint }) : null),
        el('td', { class: 'num', 'data-testid': 'type-count', text: String(r.count || 0) }),
        el('td', { class: 'last-seen' }, r.last_seen ? timeEl(r.last_seen) : el('span', { class: 'muted', text: 'not seen yet' }))));
    });
    container.appendChild(el('table', { class: 'types', 'data-testid': opts.testid }, el('thead', null, head), body));
  }

  function checkedTypes(container, kind) {
    return Array.prototype.map.call(
      container.querySelectorAll('input[data-testid="show-' + kind + '"]:checked'),
      function (b) { return { source: b.getAttribute('data-source'), type: b.getAttribute('data-type') }; });
  }

  // ---------------------------------------------------------- Admin > Events

  var eventsState = { loaded: false, tab: 'zendesk', loading: 0, saving: false };

  function markDirty(statusId) {
    return function () { setStatus($(statusId), 'Unsaved changes', 'dirty'); };
  }

  function loadEvents(keepStatus) {
    var seq = ++eventsState.loading;
    if (!keepStatus) setStatus($('events-status'), 'Loading…', 'busy');
    return Promise.all([api('GET', '/api/admin/visibility'), api('GET', '/api/admin/event_types')]).then(function (res) {
      if (seq !== eventsState.loading) return;
      var vis = res[0] || {};
      var types = (res[1] && res[1].event_types) || [];
      $('zendesk-events-enabled').checked = !!vis.zendesk_events;
      $('events-api-enabled').checked = !!vis.events_api;
      var rows = typeRows(types, vis.shown_event_types);
      var zd = rows.filter(function (r) { return r.source === 'zendesk'; });
      var custom = rows.filter(function (r) { return r.source !== 'zendesk'; });
      $('zendesk-events-count').textContent = String(zd.length);
      $('custom-events-count').textContent = String(custom.length);
      renderTypeTable($('panel-zendesk-events'), zd, {
        kind: 'event', testid: 'zendesk-event-types', withSource: false, typeHeading: 'Event type',
        hints: ZENDESK_TYPE_HINTS, onChange: markDirty('events-status'),
        empty: 'No Zendesk events received yet.',
      });
      renderTypeTable($('panel-custom-events'), custom, {
        kind: 'event', testid: 'custom-event-types', withSource: true, typeHeading: 'Event type',
        onChange: markDirty('events-status'),
        empty: 'No custom events received yet. Send some with POST /api/v2/user_profiles/events.',
      });
      eventsState.loaded = true;
      if (!keepStatus) setStatus($('events-status'), '');
    }, function (e) {
      if (seq !== eventsState.loading) return;
      setStatus($('events-status'), 'Could not load event types: ' + errText(e), 'error');
    });
  }

  function selectEventsTab(which) {
    eventsState.tab = which;
    ['zendesk', 'custom'].forEach(function (w) {
      var on = w === which;
      var tab = $('tab-' + w + '-events');
      tab.setAttribute('aria-selected', on ? 'true' : 'false');
      tab.tabIndex = on ? 0 : -1;
      $('panel-' + w + '-events').hidden = !on;
    });
  }

  $('tab-zendesk-events').addEventListener('click', function () { selectEventsTab('zendesk'); });
  $('tab-custom-events').addEventListener('click', function () { selectEventsTab('custom'); });
  $('zendesk-events-enabled').addEventListener('change', markDirty('events-status'));
  $('events-api-enabled').addEventListener('change', markDirty('events-status'));
  $('reload-events').addEventListener('click', function () { loadEvents(); });

  $('save-events').addEventListener('click', function () {
    if (eventsState.saving) return;
    if (!eventsState.loaded) { setStatus($('events-status'), 'Nothing loaded yet; reload first.', 'error'); return; }
    var btn = $('save-events');
    var status = $('events-status');
    eventsState.saving = true;
    btn.disabled = true;
    setStatus(status, 'Saving…', 'busy');
    var shown = checkedTypes($('panel-zendesk-events'), 'event').concat(checkedTypes($('panel-custom-events'), 'event'));
    var zd = $('zendesk-events-enabled').checked;
    var evApi = $('events-api-enabled').checked;
    // Re-read the settings so the profile part is kept exactly as it is now.
    api('GET', '/api/admin/visibility').then(function (cur) {
      cur = cur || {};
      return saveSettings({
        zendesk_events: zd,
        events_api: evApi,
        profiles_api: !!cur.profiles_api,
        shown_event_types: shown,
        shown_profile_types: (cur.shown_profile_types || []).map(typeRef),
      }, status);
    }).then(function (at) {
      setStatus(status, 'Saved — in effect at ' + clockTime(at), 'ok');
      return loadEvents(true);
    }, function (e) {
      setStatus(status, 'Save failed: ' + errText(e), 'error');
    }).then(function () {
      eventsState.saving = false;
      btn.disabled = false;
    });
  });

  // -------------------------------------------------------- Admin > Profiles

  var profilesState = { loaded: false, loading: 0, saving: false };

  function loadProfiles(keepStatus) {
    var seq = ++profilesState.loading;
    if (!keepStatus) setStatus($('profiles-status'), 'Loading…', 'busy');
    return Promise.all([api('GET', '/api/admin/visibility'), api('GET', '/api/admin/profile_types')]).then(function (res) {
      if (seq !== profilesState.loading) return;
      var vis = res[0] || {};
      var types = (res[1] && res[1].profile_types) || [];
      $('profiles-api-enabled').checked = !!vis.profiles_api;
      renderTypeTable($('panel-profile-types'), typeRows(types, vis.shown_profile_types), {
        kind: 'profile', testid: 'profile-types', withSource: true, typeHeading: 'Profile type',
        onChange: markDirty('profiles-status'),
        empty: 'No profiles received yet. Profiles are created with the Profiles API or when a custom event is sent.',
      });
      profilesState.loaded = true;
      if (!keepStatus) setStatus($('profiles-status'), '');
    }, function (e) {
      if (seq !== profilesState.loading) return;
      setStatus($('profiles-status'), 'Could not load profile types: ' + errText(e), 'error');
    });
  }

  $('profiles-api-enabled').addEventListener('change', markDirty('profiles-status'));
  $('reload-profiles').addEventListener('click', function () { loadProfiles(); });

  $('save-profiles').addEventListener('click', function () {
    if (profilesState.saving) return;
    if (!profilesState.loaded) { setStatus($('profiles-status'), 'Nothing loaded yet; reload first.', 'error'); return; }
    var btn = $('save-profiles');
    var status = $('profiles-status');
    profilesState.saving = true;
    btn.disabled = true;
    setStatus(status, 'Saving…', 'busy');
    var shown = checkedTypes($('panel-profile-types'), 'profile');
    var profApi = $('profiles-api-enabled').checked;
    // Re-read the settings so the event part is kept exactly as it is now.
    api('GET', '/api/admin/visibility').then(function (cur) {
      cur = cur || {};
      return saveSettings({
        zendesk_events: !!cur.zendesk_events,
        events_api: !!cur.events_api,
        profiles_api: profApi,
        shown_event_types: (cur.shown_event_types || []).map(typeRef),
        shown_profile_types: shown,
      }, status);
    }).then(function (at) {
      setStatus(status, 'Saved — in effect at ' + clockTime(at), 'ok');
      return loadProfiles(true);
    }, function (e) {
      setStatus(status, 'Save failed: ' + errText(e), 'error');
    }).then(function () {
      profilesState.saving = false;
      btn.disabled = false;
    });
  });

  // ------------------------------------------------------ customer context

  var cust = {
    userId: null,        // user shown (or being looked for)
    snapshot: null,      // last context received
    gen: 0,              // bumps to cancel stale polls
    timer: null,
    flashTimer: null,
    filterSource: '',
    filterType: '',
    expanded: {},        // profile key -> all fields shown
    openEvents: {},      // event id -> details open
  };

  function stopCustomer() {
    cust.gen++;
    if (cust.timer) { clearTimeout(cust.timer); cust.timer = null; }
  }

  function showCustomer(userId) {
    stopCustomer();
    var gen = cust.gen;
    if (!userId) {
      cust.userId = null;
      cust.snapshot = null;
      $('customer-card').hidden = true;
      setStatus($('customer-status'), 'Search for a customer by user id (12345) or identifier (email:jane@example.com).');
      $('customer-search').focus();
      return;
    }
    if (userId !== cust.userId) {
      cust.userId = userId;
      cust.snapshot = null;
      cust.filterSource = '';
      cust.filterType = '';
      cust.expanded = {};
      cust.openEvents = {};
      $('customer-card').hidden = true;
    }
    // A deep link (#/customer/ID) fills the empty search box.
    if (!$('customer-search').value) $('customer-search').value = userId;
    if (!cust.snapshot) setStatus($('customer-status'), 'Loading ' + userId + '…', 'busy');
    fetchContext(gen, false);
  }

  function fetchContext(gen, isPoll) {
    var userId = cust.userId;
    api('GET', userPath(userId, '/context')).then(function (snap) {
      if (gen !== cust.gen) return;
      var changed = !cust.snapshot || !snap || snap.version !== cust.snapshot.version || snap.user_id !== cust.snapshot.user_id;
      var hadOne = !!cust.snapshot;
      setStatus($('customer-status'), '');
      if (changed) {
        cust.snapshot = snap || {};
        renderCustomer(cust.snapshot);
        if (hadOne && isPoll) flashUpdated();
      }
    }, function (e) {
      if (gen !== cust.gen) return;
      if (e.status === 404) {
        cust.snapshot = null;
        $('customer-card').hidden = true;
        setStatus($('customer-status'), 'No such customer: ' + userId, 'error');
      } else if (e.status === 401) {
        setStatus($('customer-status'), 'Waiting for an API token…', 'error');
      } else {
        setStatus($('customer-status'), 'Could not load the customer context: ' + errText(e) + ' (retrying)', 'error');
      }
    }).then(function () {
      if (gen !== cust.gen) return;
      refreshRelativeTimes();
      cust.timer = setTimeout(function () { fetchContext(gen, true); }, POLL_MS);
    });
  }

  function flashUpdated() {
    var f = $('customer-updated');
    f.hidden = false;
    f.classList.remove('flash-on');
    void f.offsetWidth; // restart the animation
    f.classList.add('flash-on');
    if (cust.flashTimer) clearTimeout(cust.flashTimer);
    cust.flashTimer = setTimeout(function () { f.hidden = true; f.classList.remove('flash-on'); }, FLASH_MS);
  }

  function renderCustomer(snap) {
    var profiles = Array.isArray(snap.profiles) ? snap.profiles : [];
    var events = Array.isArray(snap.events) ? snap.events.slice() : [];
    var named = profiles.filter(function (p) { return p && p.name; })[0];
    $('customer-title').textContent = named ? named.name : String(snap.user_id || cust.userId);
    var meta = $('customer-meta');
    clear(meta);
    append(meta, ['User ', el('code', { 'data-testid': 'customer-user-id', text: String(snap.user_id || cust.userId) }),
      ' · version ', el('span', { 'data-testid': 'customer-version', text: String(snap.version) }),
      ' · updated ', timeEl(snap.updated_at)]);
    renderProfiles(profiles);
    // Newest first by created_at; equal times: greater id first (as the API).
    events.sort(function (a, b) {
      var ta = (parseTime(a.created_at) || 0) - 0, tb = (parseTime(b.created_at) || 0) - 0;
      if (ta !== tb) return tb - ta;
      return String(b.id) < String(a.id) ? -1 : String(b.id) > String(a.id) ? 1 : 0;
    });
    cust.events = events;
    renderFilters();
    renderTimeline();
    $('customer-card').hidden = false;
  }

  function renderProfiles(profiles) {
    var list = $('profiles-list');
    clear(list);
    $('profile-count').textContent = String(profiles.length);
    if (!profiles.length) {
      list.appendChild(el('p', { class: 'empty', 'data-testid': 'profiles-empty', text: 'No profiles shown for this customer.' }));
      return;
    }
    profiles.forEach(function (p) {
      var key = typeKey(p.source, p.type);
      var fields = flatten(p.attributes || {});
      var all = !!cust.expanded[key];
      var shown = all ? fields : fields.slice(0, FIELDS_SHOWN);
      var ids = Array.isArray(p.identifiers) ? p.identifiers : [];
      var card = el('article', { class: 'profile-card', 'data-testid': 'profile-card', 'data-source': p.source, 'data-type': p.type },
        el('header', null,
          el('h4', { 'data-testid': 'profile-name', text: p.name || '(no name)' }),
          el('span', { class: 'kind', 'data-testid': 'profile-kind' }, el('code', { text: p.source }), ' / ', el('code', { text: p.type }))),
        ids.length ? el('ul', { class: 'identifiers', 'data-testid': 'profile-identifiers', 'aria-label': 'Identifiers' },
          ids.map(function (i) {
            return el('li', null, el('span', { class: 'id-type', text: i.type }), ' ', el('span', { class: 'id-value', text: i.value }));
          })) : null,
        fields.length ? el('dl', { class: 'fields', 'data-testid': 'profile-fields' },
          shown.map(function (f) {
            return el('div', { class: 'field', 'data-testid': 'profile-field', 'data-key': f[0] },
              el('dt', { text: f[0] }), el('dd', { text: f[1] }));
          })) : el('p', { class: 'muted', text: 'No attributes.' }),
        fields.length > FIELDS_SHOWN ? el('button', {
          type: 'button', class: 'link', 'data-testid': 'view-all-fields', 'aria-expanded': all ? 'true' : 'false',
          text: all ? 'Show fewer' : 'View all (' + fields.length + ')',
          onclick: function () { cust.expanded[key] = !all; renderProfiles(profiles); },
        }) : null,
        el('p', { class: 'muted small' }, 'Updated ', timeEl(p.updated_at)));
      list.appendChild(card);
    });
  }

  function countBy(events, field) {
    var m = {};
    events.forEach(function (e) { m[e[field]] = (m[e[field]] || 0) + 1; });
    return m;
  }

  // Rebuilds the options in place (same <select> elements, so focus stays)
  // and keeps the user's selection even if no shown event has it any more.
  function fillSelect(select, allLabel, counts, selected, label) {
    clear(select);
    select.appendChild(el('option', { value: '', text: allLabel }));
    var values = Object.keys(counts).sort();
    if (selected && values.indexOf(selected) < 0) values.push(selected);
    values.forEach(function (v) {
      select.appendChild(el('option', { value: v, text: (label ? label(v) : v) + ' (' + (counts[v] || 0) + ')' }));
    });
    select.value = selected || '';
  }

  function renderFilters() {
    var events = cust.events || [];
    fillSelect($('filter-source'), 'All sources', countBy(events, 'source'), cust.filterSource);
    var bySource = events.filter(function (e) { return !cust.filterSource || e.source === cust.filterSource; });
    fillSelect($('filter-type'), 'All event types', countBy(bySource, 'type'), cust.filterType);
  }

  $('filter-source').addEventListener('change', function () {
    cust.filterSource = this.value;
    renderFilters();
    renderTimeline();
  });
  $('filter-type').addEventListener('change', function () {
    cust.filterType = this.value;
    renderTimeline();
  });

  function renderTimeline() {
    var events = cust.events || [];
    var list = $('timeline');
    clear(list);
    var shown = events.filter(function (e) {
      return (!cust.filterSource || e.source === cust.filterSource) && (!cust.filterType || e.type === cust.filterType);
    });
    $('event-count').textContent = shown.length === events.length ? String(events.length) : shown.length + ' of ' + events.length;
    shown.forEach(function (e) {
      var props = flatten(e.properties || {});
      var details = null;
      if (props.length || e.description) {
        details = el('details', { class: 'event-details', open: cust.openEvents[e.id] ? true : null },
          el('summary', { text: 'Details' }),
          el('dl', { class: 'fields' },
            el('div', { class: 'field' }, el('dt', { text: 'id' }), el('dd', { text: String(e.id) })),
            e.description ? el('div', { class: 'field' }, el('dt', { text: 'description' }), el('dd', { text: e.description })) : null,
            props.map(function (f) { return el('div', { class: 'field' }, el('dt', { text: 'properties.' + f[0] }), el('dd', { text: f[1] })); }),
            el('div', { class: 'field' }, el('dt', { text: 'received' }), el('dd', { text: absTime(e.received_at) }))));
        details.addEventListener('toggle', function () {
          if (details.open) cust.openEvents[e.id] = true; else delete cust.openEvents[e.id];
        });
      }
      list.appendChild(el('li', {
        class: 'event' + (e.source === 'zendesk' ? ' zendesk' : ' custom'),
        'data-testid': 'event', 'data-id': e.id, 'data-source': e.source, 'data-type': e.type,
      },
        el('div', { class: 'event-line' },
          el('span', { class: 'event-summary', 'data-testid': 'event-summary', text: summarize(e) }),
          timeEl(e.created_at, 'event-time')),
        el('div', { class: 'event-meta' }, el('code', { text: e.source }), ' · ', el('code', { text: e.type })),
        details));
    });
    var empty = $('timeline-empty');
    if (!events.length) { empty.hidden = false; empty.textContent = 'No interactions shown for this customer.'; }
    else if (!shown.length) { empty.hidden = false; empty.textContent = 'No interactions match the filters.'; }
    else { empty.hidden = true; empty.textContent = ''; }
  }

  function articleName(p) {
    return pick(p, 'article.display_name', 'article.title', 'article.name', 'article_title', 'title', 'article_id', 'article.id') || 'unknown article';
  }

  // A readable one-line summary of an event.
  function summarize(e) {
    var p = isPlainObject(e.properties) ? e.properties : {};
    var type = String(e.type || '');
    if (e.source !== 'zendesk') return (e.description || type) + ' (' + e.source + ')';
    var q, a, b, s;
    switch (type) {
      case 'article_viewed':
        return 'Viewed article: ' + articleName(p);
      case 'help_center_searched':
        return "Searched help center: '" + pick(p, 'search_query', 'query', 'search.query', 'search_term') + "'";
      case 'article_search_result_clicked':
      case 'article_instant_search_result_clicked':
      case 'suggested_article_clicked':
        s = 'Clicked article: ' + articleName(p);
        q = pick(p, 'search_query', 'query');
        return q ? s + " (search: '" + q + "')" : s;
      case 'answers_suggested':
        s = 'Answer Bot suggested articles';
        a = Array.isArray(p.articles) ? p.articles.map(function (x) {
          return isPlainObject(x) ? pick(x, 'display_name', 'title', 'name', 'id') : scalarText(x);
        }).filter(Boolean) : [];
        if (a.length) return s + ': ' + a.join(', ');
        q = pick(p, 'count', 'articles_count', 'number_of_articles');
        return q ? s + ' (' + q + ')' : s;
      case 'page_view':
        return 'Viewed page: ' + (pick(p, 'url', 'page_url', 'page.url', 'pageView.url', 'context.url',
          'title', 'page_title', 'page.title', 'pageView.title') || e.description || 'unknown page');
      case 'identity_created':
        a = pick(p, 'identity_type', 'type');
        b = pick(p, 'value', 'current_value');
        return 'Identity added: ' + [a, b].filter(Boolean).join(' ');
      case 'identity_changed':
        a = pick(p, 'identity_type', 'type');
        b = pick(p, 'current_value', 'value');
        q = pick(p, 'previous_value', 'previous');
        return 'Identity changed: ' + (a ? a + ' ' : '') + (q ? q + ' → ' : '') + b;
      case 'name_changed':
        b = pick(p, 'current_value', 'current', 'new_name', 'name');
        q = pick(p, 'previous_value', 'previous', 'old_name');
        return 'Name changed' + (b ? ': ' + (q ? q + ' → ' : '') + b : '');
      case 'organization_added':
      case 'organization_removed':
        a = pick(p, 'organization_name', 'organization.name', 'name', 'organization_id', 'organization.id');
        return (type === 'organization_added' ? 'Added to organization' : 'Removed from organization') + (a ? ': ' + a : '');
      case 'user_merged':
        a = pick(p, 'merged_user_id', 'source_user_id', 'source_user.id', 'previous_user_id', 'user_id');
        return 'User merged' + (a ? ' with user ' + a : '');
      default:
        if (type.indexOf('ticket_') === 0 || type === 'ticket') {
          a = pick(p, 'ticket_id', 'ticket.id', 'id');
          b = pick(p, 'subject', 'ticket.subject', 'ticket.title');
          s = 'Ticket ' + (type.slice(7).replace(/_/g, ' ') || 'event');
          return s + (a ? ' #' + a : '') + (b ? ': ' + b : '');
        }
        return e.description || humanize(type);
    }
  }

  // ------------------------------------------------------- customer search

  function resolveCustomer(input) {
    function asUserId() {
      return api('GET', userPath(input, '/context')).then(function () { return input; }, function (e) {
        if (e.status === 404) return null;
        throw e;
      });
    }
    if (input.indexOf(':') < 0) return asUserId();
    return api('GET', '/api/v2/users/lookup?identifier=' + encodeURIComponent(input)).then(function (r) {
      if (r && r.user_id !== undefined && r.user_id !== null && r.user_id !== '') return String(r.user_id);
      return asUserId();
    }, function (e) {
      // Not linked (404) or not TYPE:VALUE (400/422): user ids can look like
      // identifiers (users created from one), so try it as a user id.
      if (e.status === 404 || e.status === 400 || e.status === 422) return asUserId();
      throw e;
    });
  }

  $('customer-search-form').addEventListener('submit', function (ev) {
    ev.preventDefault();
    var input = $('customer-search').value.trim();
    if (!input) { setStatus($('customer-status'), 'Enter a user id or an identifier such as email:jane@example.com.', 'error'); return; }
    stopCustomer();
    var gen = cust.gen;
    setStatus($('customer-status'), 'Looking up ' + input + '…', 'busy');
    resolveCustomer(input).then(function (userId) {
      if (gen !== cust.gen) return;
      if (userId === null) {
        cust.userId = null;
        cust.snapshot = null;
        $('customer-card').hidden = true;
        // Leave #/customer/OLD without reloading it (replaceState fires no hashchange).
        if (location.hash !== '#/customer') history.replaceState(null, '', '#/customer');
        setStatus($('customer-status'), 'No such customer: ' + input, 'error');
        return;
      }
      go('#/customer/' + encodeURIComponent(userId));
    }, function (e) {
      if (gen !== cust.gen) return;
      setStatus($('customer-status'), 'Lookup failed: ' + errText(e), 'error');
    });
  });

  // ------------------------------------------------------------------ start

  selectEventsTab('zendesk');
  if (!location.hash) history.replaceState(null, '', '#/events');
  route();
})();
