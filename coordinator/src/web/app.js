// Fleet Updates: polls the operator API every 2 s and renders it. Plain DOM, no framework.
//
// Everything from the fleet (names, sites, error strings) was written by appliances, which may
// be compromised: it is only ever inserted as text (h() below), never as markup.
'use strict';

(() => {
  const POLL_MS = 2000;
  const AUDIT_KEEP = 200;
  const AUDIT_PAGE = 20;
  const MAX_ROWS = 100;
  // Left to right in a stage's bar: done, in flight, failed, then not started.
  const STATES = ['succeeded', 'rebooting', 'ready', 'downloading', 'pending', 'failed', 'rolled_back', 'not_started'];
  const STATE_LABEL = {
    pending: 'pending', downloading: 'downloading', ready: 'ready', rebooting: 'rebooting',
    succeeded: 'succeeded', failed: 'failed', rolled_back: 'rolled back', not_started: 'not started',
    unknown: 'unknown',
  };
  const ROLLOUT_LABEL = { in_progress: 'In progress', paused: 'Paused', completed: 'Completed', failed: 'Rolled back' };
  const DAY_ORDER = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
  const DAY_LABEL = { mon: 'Mon', tue: 'Tue', wed: 'Wed', thu: 'Thu', fri: 'Fri', sat: 'Sat', sun: 'Sun' };

  const $ = (id) => document.getElementById(id);

  let csrf = null;
  let timer = null;
  let running = false;
  let rerun = false;
  let serverNow = new Date();
  let auditAfter = null;
  let auditEntries = [];
  let appliances = [];
  let names = new Map();
  let releaseNames = new Map();
  let auditShown = AUDIT_PAGE;
  const rendered = {};
  const rolloutCards = new Map();

  // ----- small helpers -----

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  /// Re-renders a section only when its data changed, so nothing flickers and an element
  /// under the pointer is not replaced between press and release.
  function changed(key, value) {
    const text = JSON.stringify(value);
    if (rendered[key] === text) return false;
    rendered[key] = text;
    return true;
  }

  function bytes(n) {
    if (!Number.isFinite(n)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(value < 10 ? 2 : 1)} ${units[unit]}`;
  }

  const percent = (x) => `${Math.round(x * 100)}%`;
  const shortKey = (key) => (key && key.length > 12 ? `${key.slice(0, 8)}…` : key || '');
  const shortHash = (hash) => `${hash.slice(0, 12)}…`;

  const timeFormat = new Intl.DateTimeFormat(undefined, {
    weekday: 'short', day: 'numeric', month: 'short', hour: '2-digit', minute: '2-digit', timeZoneName: 'short',
  });
  const clockFormat = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', timeZoneName: 'short' });
  const auditFormat = new Intl.DateTimeFormat(undefined, {
    month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
  });
  const when = (ts) => (ts ? timeFormat.format(new Date(ts)) : '–');

  function span(seconds) {
    const s = Math.abs(Math.round(seconds));
    if (s < 90) return `${s} s`;
    if (s < 90 * 60) return `${Math.round(s / 60)} min`;
    if (s < 48 * 3600) return `${Math.round(s / 3600)} h`;
    return `${Math.round(s / 86400)} d`;
  }

  // Ages are measured on the coordinator's clock, not the browser's.
  function ago(ts) {
    const seconds = (serverNow - new Date(ts)) / 1000;
    return seconds < 5 ? 'just now' : `${span(seconds)} ago`;
  }
  const until = (ts) => `in ${span((new Date(ts) - serverNow) / 1000)}`;

  function messageOf(error) {
    if (error && error.body && typeof error.body === 'object' && error.body.error) return error.body.error;
    if (error && error.status) return `the coordinator answered ${error.status}`;
    return 'the coordinator cannot be reached';
  }

  // ----- API -----

  class HttpError extends Error {
    constructor(status, body) {
      super(`HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, body) {
    const headers = { accept: 'application/json' };
    if (method !== 'GET') headers['x-csrf-token'] = csrf || '';
    if (body !== undefined) headers['content-type'] = 'application/json';
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
    });
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = text;
    }
    if (!response.ok) throw new HttpError(response.status, data);
    return data;
  }

  // ----- sign-in -----

  function showSignIn(message) {
    csrf = null;
    clearTimeout(timer);
    $('dashboard').hidden = true;
    $('nav').hidden = true;
    $('sign-out').hidden = true;
    $('live').textContent = '';
    $('sign-in').hidden = false;
    const error = $('sign-in-error');
    error.textContent = message || '';
    error.hidden = !message;
    $('token').focus();
  }

  function showDashboard() {
    $('sign-in').hidden = true;
    $('dashboard').hidden = false;
    $('nav').hidden = false;
    $('sign-out').hidden = false;
    poll();
  }

  async function signIn(event) {
    event.preventDefault();
    const input = $('token');
    const button = event.target.querySelector('button[type=submit]');
    button.disabled = true;
    try {
      const session = await api('POST', 'api/session', { token: input.value });
      input.value = '';
      csrf = session.csrf_token;
      showDashboard();
    } catch (error) {
      showSignIn(error.status === 403 ? 'That is not the operator token.' : messageOf(error));
    } finally {
      button.disabled = false;
    }
  }

  async function signOut() {
    try {
      await api('DELETE', 'api/session');
    } catch (_) {
      // Signed out either way: the page forgets the CSRF token.
    }
    for (const key of Object.keys(rendered)) delete rendered[key];
    rolloutCards.clear();
    $('rollout-list').replaceChildren();
    auditAfter = null;
    auditEntries = [];
    auditShown = AUDIT_PAGE;
    showSignIn();
  }

  // ----- notices and actions -----

  function notice(text, kind) {
    const box = $('notice');
    box.className = `notice ${kind}`;
    $('notice-text').textContent = text;
    box.hidden = false;
  }

  async function act(button, path, done) {
    button.disabled = true;
    try {
      await api('POST', path);
      notice(done, 'ok');
    } catch (error) {
      if (error.status === 401) {
        showSignIn('Your session has ended; sign in again.');
        return;
      }
      notice(`Refused: ${messageOf(error)}`, 'error');
    }
    await poll();
  }

  function onRolloutAction(event) {
    const button = event.target.closest('button[data-action]');
    if (!button || button.disabled) return;
    const card = button.closest('[data-rollout]');
    const id = card.dataset.rollout;
    const action = button.dataset.action;
    const rollout = JSON.parse(card.dataset.json);
    if (action === 'rollback') {
      const question = `Roll back rollout #${id}? Appliances on release ${rollout.version} will be sent back to release ${rollout.previous_version}, and the rollout stops for good.`;
      if (!window.confirm(question)) return;
    }
    const past = { pause: 'paused', resume: 'resumed', advance: 'advanced to the next stage', rollback: 'rolled back' };
    act(button, `api/rollouts/${id}/${action}`, `Rollout #${id} ${past[action]}.`);
  }

  function onReleaseAction(event) {
    const button = event.target.closest('button[data-deactivate]');
    if (!button || button.disabled) return;
    const version = button.dataset.deactivate;
    const question = `Deactivate release ${version}? Appliances will no longer be offered it (this cannot be undone from here).`;
    if (!window.confirm(question)) return;
    act(button, `api/releases/${version}/deactivate`, `Release ${version} deactivated.`);
  }

  // ----- polling -----

  function setLive(ok, detail) {
    const live = $('live');
    live.className = ok ? 'live ok' : 'live down';
    // The coordinator's clock, as of the last answer: what "ago" on the page is measured from.
    if (ok) live.replaceChildren(h('span', { class: 'live-word' }, 'Live · '), clockFormat.format(serverNow));
    else live.textContent = `Reconnecting… (${detail})`;
    live.title = ok ? 'Refreshed every 2 s; the time is the coordinator\'s' : '';
  }

  async function poll() {
    if (running) {
      rerun = true;
      return;
    }
    running = true;
    clearTimeout(timer);
    try {
      const auditPath = auditAfter === null ? `api/audit?tail=${AUDIT_KEEP}` : `api/audit?after=${auditAfter}&limit=500`;
      const [rollouts, sites, fleet, releases, entries] = await Promise.all([
        api('GET', 'api/rollouts'),
        api('GET', 'api/sites'),
        api('GET', 'api/appliances'),
        api('GET', 'api/releases'),
        api('GET', auditPath),
      ]);
      serverNow = new Date(sites.server_time);
      appliances = fleet;
      names = new Map(fleet.map((a) => [a.key, a.name || shortKey(a.key)]));
      releaseNames = new Map(releases.map((r) => [r.version, r.version_name]));
      renderSummary(rollouts, sites, fleet);
      renderRollouts(rollouts);
      renderSites(sites);
      renderAppliances();
      renderReleases(releases);
      renderAudit(entries);
      setLive(true);
    } catch (error) {
      if (error.status === 401) {
        running = false;
        showSignIn('Your session has ended; sign in again.');
        return;
      }
      setLive(false, messageOf(error));
    } finally {
      running = false;
    }
    if (rerun) {
      rerun = false;
      poll();
      return;
    }
    if (csrf && !document.hidden) timer = setTimeout(poll, POLL_MS);
  }

  // ----- summary -----

  function tile(label, value, detail, kind) {
    return h('div', { class: `tile ${kind || ''}` },
      h('div', { class: 'tile-label' }, label),
      h('div', { class: 'tile-value' }, value),
      h('div', { class: 'tile-detail' }, detail || ''));
  }

  function windowsOpen(sites) {
    const open = sites.sites.filter((s) => s.next_window && s.next_window.open).length;
    return `${open} in ${open === 1 ? 'its' : 'their'} maintenance window now`;
  }

  function renderSummary(rollouts, sites, fleet) {
    const live = rollouts.filter((r) => r.state === 'in_progress' || r.state === 'paused');
    const online = fleet.filter((a) => a.online).length;
    const data = {
      windows: windowsOpen(sites),
      live: live.map((r) => [r.id, r.state, r.current_stage, r.stages.length]),
      agents: fleet.map((a) => [a.agent_update && a.agent_update.state, a.agent_previous]),
      online,
      total: fleet.length,
      release: sites.release,
      sites: sites.sites.length,
    };
    if (!changed('summary', data)) return;
    const rollout = live[0];
    $('summary').replaceChildren(
      tile('Appliances', String(fleet.length), `${online} online · ${fleet.length - online} offline`),
      tile('Current release', sites.release ? `v${sites.release.version}` : '–',
        sites.release ? `${sites.release.version_name} · ${bytes(sites.release.size)}` : 'none published'),
      rollout
        ? tile('Live rollout', `#${rollout.id} · ${ROLLOUT_LABEL[rollout.state]}`,
          `stage ${rollout.current_stage + 1} of ${rollout.stages.length}`, rollout.state === 'paused' ? 'warn' : 'ok')
        : tile('Live rollout', 'none', 'start one with the CLI'),
      tile('Sites', String(sites.sites.length), windowsOpen(sites)),
      agentTile(fleet),
    );
  }

  // Agent updates across the fleet: how many of the finished ones succeeded.
  function agentTile(fleet) {
    const finished = fleet.map((a) => a.agent_update).filter((u) => u && ['succeeded', 'failed', 'rolled_back'].includes(u.state));
    const succeeded = finished.filter((u) => u.state === 'succeeded').length;
    const kept = fleet.filter((a) => given(a.agent_previous)).length;
    if (!finished.length) return tile('Agent updates', '–', `none finished yet · ${kept} can roll back`);
    const rate = succeeded / finished.length;
    return tile('Agent updates', percent(rate), `${succeeded} of ${finished.length} succeeded · ${kept} can roll back`,
      rate < 0.95 ? 'warn' : 'ok');
  }

  // ----- rollouts -----

  function legendItems(counts) {
    return STATES.filter((state) => !counts || counts[state])
      .map((state) => h('span', { class: 'legend-item' },
        h('span', { class: `swatch s-${state}`, 'aria-hidden': 'true' }),
        counts ? `${counts[state]} ${STATE_LABEL[state]}` : STATE_LABEL[state]));
  }

  function stageRow(rollout, index) {
    const plan = rollout.stages[index];
    const counts = (rollout.stage_counts[index] || { members: 0, by_state: {} });
    const byState = counts.by_state || {};
    const members = counts.members;
    const status = index < rollout.current_stage ? 'done' : index === rollout.current_stage ? 'current' : 'upcoming';
    const succeeded = byState.succeeded || 0;
    const segments = STATES.filter((state) => byState[state]).map((state) => {
      const seg = h('span', {
        class: `seg s-${state}`,
        dataset: { state, count: String(byState[state]) },
        title: `${byState[state]} ${STATE_LABEL[state]}`,
      });
      seg.style.width = `${(100 * byState[state]) / members}%`;
      return seg;
    });
    const described = STATES.filter((s) => byState[s]).map((s) => `${byState[s]} ${STATE_LABEL[s]}`).join(', ');
    return h('div', { class: `stage ${status}`, dataset: { stage: String(index) } },
      h('div', { class: 'stage-label' },
        h('strong', {}, `Stage ${index + 1}`),
        h('span', { class: 'muted' }, ` up to ${plan.percent}% · ${members} appliance${members === 1 ? '' : 's'}`),
        status === 'current' ? h('span', { class: 'tag' }, 'current') : null,
        h('span', { class: 'stage-done' }, members ? `${succeeded}/${members} succeeded` : '')),
      h('div', {
        class: `bar${members ? '' : ' empty'}`,
        role: 'img',
        'aria-label': `Stage ${index + 1}: ${described || 'no appliances'}`,
      }, segments.length ? segments : h('span', { class: 'bar-empty' }, 'no appliances')),
      members ? h('div', { class: 'legend small' }, legendItems(byState)) : null);
  }

  function nextStageText(rollout) {
    if (rollout.state === 'completed') return 'Completed: every stage succeeded.';
    if (rollout.state === 'failed') {
      return rollout.rolled_back ? `Rolled back to release ${rollout.previous_version}.` : 'Stopped.';
    }
    const last = rollout.current_stage >= rollout.stages.length - 1;
    if (last) return 'Last stage: completes when every online appliance has succeeded.';
    if (rollout.strategy === 'canary' && rollout.current_stage === 0) return 'Canary: waits for an operator to advance.';
    if (!rollout.next_stage_at) return '–';
    const at = new Date(rollout.next_stage_at);
    return at > serverNow
      ? `Next stage not before ${when(rollout.next_stage_at)} (${until(rollout.next_stage_at)}), once this stage is healthy.`
      : 'Delay passed: advances once every online appliance of this stage has succeeded.';
  }

  function rolloutLabel(rollout) {
    return rollout.kind === 'agent' ? `agent release ${rollout.version}` : releaseLabel(rollout.version);
  }

  function releaseLabel(version) {
    const name = releaseNames.get(version);
    return name ? `release ${version} · ${name}` : `release ${version}`;
  }

  function rateMeter(rollout) {
    const over = rollout.failure_rate > rollout.failure_threshold;
    const fill = h('span', { class: `fill${over ? ' over' : ''}` });
    fill.style.width = `${Math.min(100, rollout.failure_rate * 100)}%`;
    const mark = h('span', { class: 'threshold', title: `auto-pause above ${percent(rollout.failure_threshold)}` });
    mark.style.left = `${Math.min(100, rollout.failure_threshold * 100)}%`;
    return h('div', { class: 'rate' },
      h('div', { class: 'fact-label' }, `Failure rate, stage ${rollout.current_stage + 1}`),
      h('div', { class: 'fact-value' },
        h('strong', { class: over ? 'bad' : '' }, percent(rollout.failure_rate)),
        h('span', { class: 'muted' }, ` of finished · auto-pause above ${percent(rollout.failure_threshold)}`)),
      h('div', { class: 'meter', role: 'img', 'aria-label': `failure rate ${percent(rollout.failure_rate)}, threshold ${percent(rollout.failure_threshold)}` }, fill, mark));
  }

  function rolloutCard(id) {
    let card = rolloutCards.get(id);
    if (card) return card;
    const button = (action, label, kind) => h('button', { type: 'button', class: kind, dataset: { action } }, label);
    card = {
      root: h('article', { class: 'card rollout', dataset: { rollout: String(id) } }),
      head: h('header', { class: 'rollout-head' }),
      reason: h('p', { class: 'reason', role: 'note' }),
      facts: h('div', { class: 'facts' }),
      stages: h('div', { class: 'stages' }),
      buttons: {
        pause: button('pause', 'Pause', 'secondary'),
        resume: button('resume', 'Resume', 'primary'),
        advance: button('advance', 'Advance stage', 'secondary'),
        rollback: button('rollback', 'Roll back…', 'danger'),
      },
    };
    const actions = h('div', { class: 'actions' }, Object.values(card.buttons));
    card.root.append(card.head, card.reason, card.facts, card.stages, actions);
    rolloutCards.set(id, card);
    return card;
  }

  function updateRolloutCard(card, rollout) {
    const root = card.root;
    root.dataset.state = rollout.state;
    root.dataset.json = JSON.stringify({ kind: rollout.kind, version: rollout.version, previous_version: rollout.previous_version });
    const view = { ...rollout, members: undefined, next: nextStageText(rollout), name: rolloutLabel(rollout) };
    if (!changed(`rollout-${rollout.id}`, view)) return;
    card.head.replaceChildren(
      h('div', {},
        h('h3', {}, `Rollout #${rollout.id} `, h('span', { class: 'muted' }, view.name)),
        h('div', { class: 'muted meta' },
          `${rollout.strategy} · ${rollout.stages.length} stage${rollout.stages.length === 1 ? '' : 's'}`,
          ` · ${percent(rollout.success_rate)} of finished succeeded`,
          rollout.groups.length ? ` · groups ${rollout.groups.join(', ')}` : ' · whole fleet',
          ` · started ${when(rollout.created)}`)),
      h('span', { class: `badge r-${rollout.state}` }, ROLLOUT_LABEL[rollout.state] || rollout.state));
    card.reason.textContent = rollout.paused_reason || '';
    card.reason.hidden = !rollout.paused_reason;
    card.reason.className = `reason ${rollout.state === 'paused' ? 'warn' : ''}`;
    card.facts.replaceChildren(
      h('div', { class: 'fact' },
        h('div', { class: 'fact-label' }, 'Current stage'),
        h('div', { class: 'fact-value' }, h('strong', {}, `${rollout.current_stage + 1} of ${rollout.stages.length}`),
          h('span', { class: 'muted' }, ` · up to ${rollout.stages[rollout.current_stage].percent}% of the fleet`))),
      rateMeter(rollout),
      h('div', { class: 'fact' },
        h('div', { class: 'fact-label' }, 'Next stage'),
        h('div', { class: 'fact-value next-stage' }, view.next)));
    card.stages.replaceChildren(...rollout.stages.map((_, i) => stageRow(rollout, i)));
    const live = rollout.state === 'in_progress' || rollout.state === 'paused';
    const b = card.buttons;
    b.pause.hidden = !live;
    b.resume.hidden = !live;
    b.advance.hidden = !live;
    b.pause.disabled = rollout.state !== 'in_progress';
    b.resume.disabled = rollout.state !== 'paused';
    b.advance.disabled = rollout.current_stage >= rollout.stages.length - 1;
    const canRollBack = !rollout.rolled_back && rollout.previous_version !== null && rollout.previous_version !== undefined;
    b.rollback.hidden = !canRollBack;
    b.rollback.disabled = !canRollBack;
    const back = rollout.kind === 'agent' ? 'agent release' : 'release';
    b.rollback.title = canRollBack ? `Send the fleet back to ${back} ${rollout.previous_version}` : '';
  }

  function renderRollouts(rollouts) {
    const live = rollouts.filter((r) => r.state === 'in_progress' || r.state === 'paused');
    const finished = rollouts.filter((r) => !live.includes(r)).sort((a, b) => b.id - a.id).slice(0, 3);
    const shown = [...live.sort((a, b) => b.id - a.id), ...finished];
    const list = $('rollout-list');
    if (!shown.length) {
      if (changed('rollouts-empty', true)) {
        list.replaceChildren(h('p', { class: 'empty' }, 'No rollouts yet. Start one with ',
          h('code', {}, 'sitecast-coordinator rollout create'), '.'));
      }
      return;
    }
    delete rendered['rollouts-empty'];
    const cards = shown.map((rollout) => {
      const card = rolloutCard(rollout.id);
      updateRolloutCard(card, rollout);
      return card.root;
    });
    // Only touch the list when its membership or order changed: moving a node would reset
    // a button being pressed.
    const same = cards.length === list.children.length && cards.every((c, i) => list.children[i] === c);
    if (!same) list.replaceChildren(...cards);
    for (const id of rolloutCards.keys()) {
      if (!shown.some((r) => r.id === id)) rolloutCards.delete(id);
    }
  }

  // ----- sites -----

  function days(list) {
    const sorted = DAY_ORDER.filter((d) => list.includes(d));
    if (sorted.length === 7) return 'daily';
    if (!sorted.length) return 'never';
    return sorted.map((d) => DAY_LABEL[d]).join(' ');
  }

  function renderSites(overview) {
    const release = overview.release;
    const data = { release, sites: overview.sites, unattributed: overview.unattributed_origin_bytes };
    if (!changed('sites', data)) return;
    $('sites-release').textContent = release
      ? `Offload for release ${release.version} (${release.version_name}, ${bytes(release.size)}): ideally each site takes about one copy from the origin and the rest over its LAN.`
      : 'No release yet.';
    const cards = overview.sites.map((site) => {
      // Bytes from the release's mirrors (a CDN) are origin bytes too, counted by the appliances.
      const mirror = site.mirror_bytes || 0;
      const fromOrigin = site.origin_bytes + mirror;
      const total = fromOrigin + site.lan_bytes;
      const share = h('div', { class: 'offload', role: 'img', 'aria-label': total ? `${percent(site.lan_bytes / total)} of bytes from LAN peers` : 'no bytes yet' });
      if (total) {
        const lan = h('span', { class: 'lan' });
        lan.style.width = `${(100 * site.lan_bytes) / total}%`;
        const origin = h('span', { class: 'origin' });
        origin.style.width = `${(100 * fromOrigin) / total}%`;
        share.append(origin, lan);
      }
      const w = site.window;
      const next = site.next_window;
      return h('article', { class: 'card site', dataset: { site: site.site } },
        h('header', { class: 'site-head' },
          h('h3', {}, site.site),
          h('span', { class: 'pills' },
            h('span', { class: 'pill ok' }, `${site.online} online`),
            site.offline ? h('span', { class: 'pill off' }, `${site.offline} offline`) : null)),
        h('dl', { class: 'kv' },
          h('dt', {}, 'From origin'),
          h('dd', { class: 'origin-copies' },
            h('strong', {}, site.origin_copies === null || site.origin_copies === undefined ? '–' : `${site.origin_copies.toFixed(2)}×`),
            h('span', { class: 'muted' }, ` image · ${bytes(fromOrigin)}`),
            mirror ? h('span', { class: 'muted mirror-bytes' }, ` (${bytes(mirror)} from mirrors)`) : null),
          h('dt', {}, 'From LAN'),
          h('dd', { class: 'lan-bytes' }, h('strong', {}, bytes(site.lan_bytes)),
            total ? h('span', { class: 'muted' }, ` · ${percent(site.lan_bytes / total)} of bytes`) : null),
          site.reused_bytes ? h('dt', {}, 'Reused') : null,
          site.reused_bytes ? h('dd', { class: 'reused-bytes' }, h('strong', {}, bytes(site.reused_bytes)),
            h('span', { class: 'muted' }, ' copied from active slots')) : null,
          h('dt', {}, 'Updated'),
          h('dd', {}, release ? `${site.on_release} of ${site.appliances} on v${release.version}` : '–'),
          h('dt', {}, 'Window'),
          h('dd', { class: 'window' },
            `${w.start}–${w.end} ${w.timezone}, ${days(w.days)}`,
            site.window_is_default ? h('span', { class: 'muted' }, ' (fleet default)') : null,
            h('br'),
            next
              ? h('span', { class: next.open ? 'window-open' : 'muted' }, next.open ? `open now: ${next.local}` : `next: ${next.local}`)
              : h('span', { class: 'muted' }, 'never opens'))),
        share,
        h('div', { class: 'legend small' },
          h('span', { class: 'legend-item' }, h('span', { class: 'swatch origin', 'aria-hidden': 'true' }), 'origin'),
          h('span', { class: 'legend-item' }, h('span', { class: 'swatch lan', 'aria-hidden': 'true' }), 'LAN peers')));
    });
    if (overview.unattributed_origin_bytes) {
      cards.push(h('p', { class: 'muted' }, `Plus ${bytes(overview.unattributed_origin_bytes)} served to unsigned requests.`));
    }
    $('site-list').replaceChildren(...(cards.length ? cards : [h('p', { class: 'empty' }, 'No appliances have checked in yet.')]));
  }

  // One table cell. Its content sits in a single element so that on phones, where each row
  // becomes a card, the label (CSS ::before) and the content are exactly two grid items.
  function cell(label, props, ...children) {
    return h('td', { ...props, 'data-label': label }, h('div', { class: 'cell' }, ...children));
  }

  // ----- appliances -----

  function applianceState(a) {
    return a.update ? a.update.state : 'idle';
  }

  function given(value) {
    return value !== null && value !== undefined;
  }

  // The agent release an appliance runs, where its agent update is, and whether the launcher
  // keeps a version to roll back to.
  function agentCell(a) {
    // A device whose own client speaks hawkBit DDI: that client, and what it last said.
    if (a.ddi) {
      const said = a.ddi.last_feedback;
      return cell('Agent', {}, h('span', { class: 'tag' }, 'hawkBit DDI'),
        said ? h('div', { class: 'muted', title: said }, said.length > 80 ? `${said.slice(0, 80)}…` : said) : null);
    }
    const update = a.agent_update;
    const release = a.agent_release;
    const pending = update && update.version !== release && update.state !== 'succeeded';
    const moving = pending && !['failed', 'rolled_back'].includes(update.state);
    return cell('Agent', {}, given(release) ? `agent ${release}` : (a.agent_version || '–'),
      moving ? h('span', { class: 'muted' }, ` → ${update.version}`) : null,
      pending ? h('span', { class: `badge u-${update.state}` }, STATE_LABEL[update.state] || update.state) : null,
      given(a.agent_pin) ? h('span', { class: 'tag' }, `pinned agent ${a.agent_pin}`) : null,
      given(a.agent_previous) ? h('div', { class: 'muted' }, `rollback to ${a.agent_previous} available`) : null);
  }

  function errorText(a) {
    if (a.update && a.update.error) return a.update.error;
    const agent = a.agent_update;
    return agent && agent.error && agent.version !== a.agent_release ? `agent ${agent.version}: ${agent.error}` : '';
  }

  function fillSelect(select, values, label, show) {
    const current = select.value;
    const options = [h('option', { value: '' }, label), ...values.map((v) => h('option', { value: v }, show(v)))];
    select.replaceChildren(...options);
    select.value = values.includes(current) ? current : '';
  }

  function renderAppliances() {
    const sites = [...new Set(appliances.map((a) => a.site))].sort();
    const states = [...new Set(appliances.map(applianceState))].sort();
    if (changed('appliance-filters', { sites, states })) {
      fillSelect($('filter-site'), sites, 'All sites', (site) => site);
      fillSelect($('filter-state'), states, 'All states', (state) => STATE_LABEL[state] || state);
    }
    const text = $('filter-text').value.trim().toLowerCase();
    const site = $('filter-site').value;
    const state = $('filter-state').value;
    const matches = appliances.filter((a) => {
      if (site && a.site !== site) return false;
      if (state && applianceState(a) !== state) return false;
      if (!text) return true;
      const haystack = [a.name, a.key, a.site, a.group, `v${a.installed_version}`, applianceState(a),
        a.update && a.update.error, a.active_slot, given(a.agent_release) && `agent ${a.agent_release}`,
        a.ddi && 'hawkbit ddi', a.ddi && a.ddi.last_feedback,
        errorText(a)].filter(Boolean).join(' ').toLowerCase();
      return haystack.includes(text);
    }).sort((a, b) => a.site.localeCompare(b.site) || a.name.localeCompare(b.name) || a.key.localeCompare(b.key));
    const rows = matches.slice(0, MAX_ROWS);
    const view = { rows, text, site, state, now: serverNow.getTime() };
    if (!changed('appliances', view)) return;
    $('appliance-count').textContent = matches.length === appliances.length
      ? `${appliances.length} in the fleet`
      : `${matches.length} of ${appliances.length} match${matches.length > MAX_ROWS ? ` (first ${MAX_ROWS} shown)` : ''}`;
    const body = $('appliance-table').tBodies[0];
    if (!rows.length) {
      body.replaceChildren(h('tr', {}, h('td', { colspan: '8', class: 'empty' },
        appliances.length ? 'No appliance matches the filter.' : 'No appliance has checked in yet.')));
      return;
    }
    body.replaceChildren(...rows.map((a) => {
      const update = a.update;
      const st = applianceState(a);
      const moving = update && update.version !== a.installed_version && !['succeeded', 'failed', 'rolled_back'].includes(update.state);
      return h('tr', { dataset: { key: a.key, state: st } },
        cell('Appliance', {}, h('div', { class: 'name' }, a.name || shortKey(a.key)),
          h('div', { class: 'mono muted', title: a.key }, shortKey(a.key))),
        cell('Site', {}, a.site, a.group ? h('div', { class: 'muted' }, a.group) : null),
        cell('Version', {}, `v${a.installed_version}`, moving ? h('span', { class: 'muted' }, ` → v${update.version}`) : null,
          a.pin_version !== null && a.pin_version !== undefined ? h('span', { class: 'tag' }, `pinned v${a.pin_version}`) : null),
        agentCell(a),
        cell('State', {}, h('span', { class: `badge u-${st}` }, STATE_LABEL[st] || st),
          update && typeof update.progress === 'number' && update.state === 'downloading'
            ? h('span', { class: 'muted' }, ` ${percent(update.progress)}`) : null),
        cell('Last check-in', {},
          h('span', { class: `dot ${a.online ? 'on' : 'off'}`, 'aria-hidden': 'true' }),
          ago(a.last_checkin), a.online ? '' : h('span', { class: 'muted' }, ' · offline')),
        cell('Slot', {}, a.active_slot || '–'),
        cell('Error', { class: 'error-text' }, errorText(a)));
    }));
  }

  // ----- releases -----

  function renderReleases(releases) {
    const data = releases.map(({ manifest, ...rest }) => rest);
    if (!changed('releases', data)) return;
    const body = $('release-table').tBodies[0];
    if (!data.length) {
      body.replaceChildren(h('tr', {}, h('td', { colspan: '6', class: 'empty' }, 'No releases yet. Publish one with ',
        h('code', {}, 'sitecast-coordinator release publish'), '.')));
      return;
    }
    body.replaceChildren(...[...data].sort((a, b) => b.version - a.version).map((r) => h('tr', { dataset: { version: String(r.version) } },
      cell('Version', {}, h('div', { class: 'name' }, `v${r.version}`), h('div', { class: 'muted' }, r.version_name)),
      cell('Created', {}, when(r.created), h('div', { class: 'muted' }, `published ${when(r.published)}`)),
      cell('Size', {}, r.blake3 ? bytes(r.size) : h('span', { class: 'muted' }, 'no sitecast image'),
        r.swu ? h('div', { class: 'muted', title: `SHA-256 ${r.swu.sha256}` }, `SWUpdate ${r.swu.filename} · ${bytes(r.swu.size)}`) : null),
      cell('Hashes', {}, r.blake3
        ? h('details', { class: 'hashes' },
          h('summary', { class: 'mono' }, `b3 ${shortHash(r.blake3)}`),
          h('div', { class: 'mono wrap' }, `BLAKE3 ${r.blake3}`),
          h('div', { class: 'mono wrap' }, `SHA-256 ${r.sha256}`))
        : '–'),
      cell('Notes', {}, r.notes || '',
        r.rollback_floor ? h('div', { class: 'muted' }, `rollback floor v${r.rollback_floor}`) : null),
      cell('Status', {},
        h('span', { class: `badge ${r.active ? 'active' : 'inactive'}` }, r.active ? 'active' : 'deactivated'),
        r.active ? h('button', { type: 'button', class: 'ghost small', dataset: { deactivate: String(r.version) } }, 'Deactivate…') : null))));
  }

  // ----- audit -----

  function appliance(key) {
    const name = names.get(key);
    return name ? `${name} (${shortKey(key)})` : shortKey(key);
  }

  function detailText(detail) {
    if (detail === null || typeof detail !== 'object' || Array.isArray(detail)) {
      return JSON.stringify(detail === undefined ? null : detail);
    }
    return Object.entries(detail)
      .filter(([, value]) => value !== null && value !== undefined)
      .map(([key, value]) => {
        if (key === 'appliance' && typeof value === 'string') return `appliance ${appliance(value)}`;
        const text = typeof value === 'string' ? value : JSON.stringify(value);
        return `${key} ${text.replace(/[0-9a-f]{64}/g, (k) => shortKey(k))}`;
      })
      .join(' · ');
  }

  function renderAudit(entries) {
    if (entries.length || auditAfter === null) {
      auditEntries = auditEntries.concat(entries).slice(-AUDIT_KEEP);
      if (auditEntries.length) auditAfter = auditEntries[auditEntries.length - 1].seq;
      else if (auditAfter === null) auditAfter = 0;
    }
    const newest = auditEntries.slice().reverse().slice(0, auditShown);
    // Appliance names arrive with the fleet, so they are part of what is drawn.
    if (!changed('audit', { seqs: newest.map((e) => e.seq), names: [...names], shown: auditShown })) return;
    const body = $('audit-table').tBodies[0];
    const more = $('audit-more');
    const hidden = auditEntries.length - newest.length;
    more.hidden = hidden <= 0;
    more.textContent = `Show ${Math.min(hidden, AUDIT_PAGE * 2)} more`;
    if (!newest.length) {
      body.replaceChildren(h('tr', {}, h('td', { colspan: '5', class: 'empty' }, 'Nothing yet.')));
      return;
    }
    body.replaceChildren(...newest.map((e) => {
      const detail = detailText(e.detail);
      const actor = e.actor.startsWith('appliance:') ? appliance(e.actor.slice(10)) : e.actor;
      return h('tr', { dataset: { seq: String(e.seq), action: e.action } },
        cell('#', { class: 'mono muted' }, String(e.seq)),
        cell('Time', { class: 'nowrap' }, auditFormat.format(new Date(e.at))),
        cell('Actor', { title: e.actor }, actor),
        cell('Action', {}, h('code', {}, e.action)),
        cell('Detail', { class: 'detail', title: detail }, detail.length > 160 ? `${detail.slice(0, 160)}…` : detail));
    }));
  }

  // ----- start -----

  async function start() {
    $('state-legend').replaceChildren(...legendItems(null));
    $('sign-in-form').addEventListener('submit', signIn);
    $('sign-out').addEventListener('click', signOut);
    $('notice-close').addEventListener('click', () => { $('notice').hidden = true; });
    $('rollout-list').addEventListener('click', onRolloutAction);
    $('release-table').addEventListener('click', onReleaseAction);
    $('audit-more').addEventListener('click', () => {
      auditShown += AUDIT_PAGE * 2;
      renderAudit([]);
    });
    for (const id of ['filter-text', 'filter-site', 'filter-state']) {
      $(id).addEventListener('input', renderAppliances);
    }
    document.addEventListener('visibilitychange', () => {
      if (!document.hidden && csrf) poll();
    });
    try {
      const session = await api('GET', 'api/session');
      if (session.signed_in) {
        csrf = session.csrf_token;
        showDashboard();
      } else {
        showSignIn();
      }
    } catch (error) {
      showSignIn(messageOf(error));
    }
  }

  start();
})();
