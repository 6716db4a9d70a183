/*! analytics.js: the browser client of the analytics service. Plain JavaScript, no build, no dependencies.
 *
 * Install: <script src="https://YOUR-ANALYTICS-HOST/analytics.js" data-page-view></script>
 * API: analytics.track(type, payload) -> the event's id, analytics.identify(userId), analytics.flush(),
 * analytics.enabled (false under Global Privacy Control or Do Not Track).
 * Settings are data- attributes on that tag; docs/browser-client.md lists them.
 */
(() => {
  if (window.analytics?.track) return // the tag twice on one page: the first one serves

  const script = document.currentScript
  const attr = (name) => script?.getAttribute('data-' + name)
  const number = (name, fallback) => {
    const value = parseFloat(attr(name))
    return value >= 0 ? value : fallback
  }

  const ENDPOINT = attr('endpoint') || new URL('/api/analytics', script?.src || location.href).href
  const BATCH_SIZE = number('batch-size', 20)
  const FLUSH_INTERVAL = number('flush-interval', 5000) // ms
  const RETRY_BASE = number('retry-base', 1000) // ms: the first retry waits up to this, each next up to twice as long
  const RETRY_MAX = number('retry-max', 60000) // ms: the longest wait between retries
  // Failed tries after which an event is dropped, with a console.warn; the count goes with the events stored
  // for later pages. 5xx and 429 may last a while (an outage, a deployment): at the default settings the
  // waits before the 20th try add up to 14 minutes at most, 7 on average.
  const MAX_TRIES = 20
  // The cap when a try got no answer to read (status 0): a network failure, or an answer the browser hides (one
  // without CORS headers, such as the service's 403 to an origin it does not allow), or a request a blocker or
  // a Content-Security-Policy stopped. Only the first can pass; six tries give it up to 31 s.
  const MAX_TRIES_UNANSWERED = 6
  // sendBeacon and keepalive fetch refuse bodies past this (in flight, all together).
  const MAX_BATCH_BYTES = 65536
  // What survives a reload in localStorage: at most this many events, none older than a day.
  const MAX_QUEUE = 500
  const MAX_AGE = 864e5
  const PREFIX = 'analytics:unsent:'

  const store = (area, key, value) => {
    // Storage may be absent or throw (blocked cookies, private modes, full quota): then we live without it.
    try {
      const s = window[area]
      return value === undefined ? s.getItem(key) : value === null ? s.removeItem(key) : s.setItem(key, value)
    } catch {}
  }
  const uuid = () =>
    // randomUUID exists only in secure contexts (https, localhost); plain-http pages build a v4 UUID themselves.
    crypto.randomUUID?.() ??
    '10000000-1000-4000-8000-100000000000'.replace(/[018]/g, (c) =>
      (c ^ (crypto.getRandomValues(new Uint8Array(1))[0] & (15 >> (c / 4)))).toString(16),
    )
  const bytes = (text) => new Blob([text]).size
  const texts = (events) => events.map((e) => e.json)
  const body = (batch) => `{"timestamp":"${new Date().toISOString()}","events":[${texts(batch)}]}`
  const parsed = (events) => events.map((e) => JSON.parse(e.json))

  // Global Privacy Control or Do Not Track: nothing is queued, stored or sent, unless the site opts out.
  const off =
    attr('respect-privacy') != 'false' &&
    !!(navigator.globalPrivacyControl || navigator.doNotTrack == '1' || window.doNotTrack == '1')
  const KEY = PREFIX + uuid() // this page's unsent events, written when it is hidden
  let sessionId // per tab: sessionStorage lives as long as the tab, across reloads
  let userId

  let queue = [] // events as {json: their JSON text, made when tracked, tries: how many sends of them failed}
  let inflight = null // the batch being sent or waiting to be retried: one at a time, in order
  let attempt = 0 // failed tries of the batch in flight on this page; not 0 means the service is failing
  let cap = BATCH_SIZE // events a batch may hold: halved by each 413
  let timer = 0
  // analytics.flush() was called: send what is queued, batch after batch, without waiting for the timer. Kept
  // while a batch is in flight, whose outcome then sends the rest: a flush asked for meanwhile is not lost.
  let flushing = false

  const take = () => {
    // The next batch: up to cap events within MAX_BATCH_BYTES (a single larger event goes alone).
    let n = 0
    let size = 64 // the envelope
    while ((n < queue.length && n < cap && (size += bytes(queue[n].json) + 1) <= MAX_BATCH_BYTES) || (!n && queue.length)) n++
    return queue.splice(0, n)
  }

  const schedule = () => {
    if (inflight) return // its outcome schedules the next batch
    if (!queue.length) flushing = false
    if (flushing || queue.length >= cap || bytes(texts(queue).join()) > MAX_BATCH_BYTES - 64) flush()
    else if (queue.length) timer ||= setTimeout(flush, FLUSH_INTERVAL)
  }

  const flush = () => {
    clearTimeout(timer)
    timer = 0
    if (off || inflight || !queue.length) return
    send((inflight = take()))
  }

  const send = async (batch) => {
    const text = body(batch)
    let response
    try {
      // A string body goes as text/plain: a CORS simple request, so no preflight. keepalive lets it finish
      // after the page is gone, but refuses bodies over 64 KiB.
      response = await fetch(ENDPOINT, { method: 'POST', body: text, keepalive: bytes(text) <= MAX_BATCH_BYTES })
    } catch {} // a network error, or an answer the browser hides from us: see MAX_TRIES_UNANSWERED
    const status = response?.status || 0
    if (!status || status == 429 || status >= 500) {
      // A try while the browser knows it is offline never left the device: it does not count.
      if (status || navigator.onLine) for (const e of batch) e.tries++
      const limit = status ? MAX_TRIES : MAX_TRIES_UNANSWERED
      const spent = batch.filter((e) => e.tries >= limit)
      if (spent.length) console.warn('analytics: events dropped after', limit, 'failed tries', status, parsed(spent))
      inflight = batch = batch.filter((e) => e.tries < limit)
      if (batch.length) {
        const after = response?.headers.get('Retry-After')
        const wait = after ? (isNaN(after) ? Date.parse(after) - Date.now() : after * 1000) : NaN
        // Exponential backoff with full jitter: anywhere from 0 to base * 2^attempt, capped.
        const jitter = Math.random() * Math.min(RETRY_MAX, RETRY_BASE * 2 ** attempt++)
        persist()
        return setTimeout(() => send(batch), wait >= 0 ? wait : jitter)
      }
    } else if (status == 413 && batch.length > 1) {
      cap = batch.length >> 1 // and so on, down to one event a batch
      queue.unshift(...batch)
    } else {
      // Not retried: the same batch would be refused again. The warnings are for the site's developers.
      const result = await response.json().catch(() => ({}))
      try {
        if (status >= 300) console.warn('analytics: batch refused', status, result, parsed(batch))
        for (const { index, errors } of result.rejected || []) {
          console.warn('analytics: event rejected', JSON.parse(batch[index].json), errors)
        }
      } catch {} // an answer of an unexpected shape (from a proxy, say) must not stop the queue
    }
    attempt = 0
    inflight = null
    persist()
    schedule()
  }

  const save = (events) => store('localStorage', KEY, events.length ? JSON.stringify(events) : null)
  // While the page is hidden it may be discarded without another event: keep what is unacknowledged stored.
  const persist = () => document.visibilityState == 'hidden' && save((inflight || []).concat(queue))

  const leave = () => {
    // The page may be gone next: a healthy service gets the queue by sendBeacon now; a failing one
    // (retries under way) keeps everything in localStorage, which the next page load sends.
    clearTimeout(timer)
    timer = 0
    if (off) return
    while (!attempt && queue.length) {
      const batch = take()
      let queued = false
      try {
        const text = body(batch)
        queued = navigator.sendBeacon
          ? navigator.sendBeacon(ENDPOINT, text)
          : (fetch(ENDPOINT, { method: 'POST', body: text, keepalive: true }).catch(() => {}), true)
      } catch {} // a bad endpoint, or a Content-Security-Policy that forbids it
      if (!queued) {
        queue.unshift(...batch) // over the beacon quota, say: left for the next page
        break
      }
    }
    save(attempt ? (inflight || []).concat(queue) : queue)
  }

  const track = (type, payload) => {
    if (off) return
    const event = { type, id: uuid(), timestamp: new Date().toISOString(), sessionId }
    if (payload != null) event.payload = payload
    if (userId) event.userId = userId
    queue.push({ json: JSON.stringify(event), tries: 0 }) // throws here, to the caller, on a payload JSON cannot hold
    if (queue.length + (inflight?.length || 0) > MAX_QUEUE) {
      console.warn('analytics: too many unsent events, dropped', JSON.parse(queue.shift().json))
    }
    schedule()
    return event.id
  }

  if (!off) {
    sessionId = store('sessionStorage', 'analytics:session')
    if (!sessionId) store('sessionStorage', 'analytics:session', (sessionId = uuid()))
    userId = store('sessionStorage', 'analytics:user')
    // Events earlier pages could not send: claim them (each page stores under its own key) and send them now.
    try {
      for (const key of Object.keys(localStorage).filter((k) => k.startsWith(PREFIX))) {
        queue.push(...JSON.parse(localStorage.getItem(key)))
        localStorage.removeItem(key)
      }
      queue = queue.filter((e) => Date.now() - Date.parse(JSON.parse(e.json).timestamp) < MAX_AGE).slice(-MAX_QUEUE)
    } catch {
      queue = []
    }
    flush()
    addEventListener('pagehide', leave)
    addEventListener('pageshow', () => save([])) // back from the back/forward cache: the events are ours again
    document.addEventListener('visibilitychange', () => (document.visibilityState == 'hidden' ? leave() : save([])))
  }

  window.analytics = {
    track,
    identify: (id) => off || store('sessionStorage', 'analytics:user', (userId = id == null ? null : '' + id)),
    flush: () => {
      flushing = true
      schedule()
    },
    enabled: !off,
  }
  if (attr('page-view') != null) track('page_view', { url: location.href, referrer: document.referrer, title: document.title })
})()
