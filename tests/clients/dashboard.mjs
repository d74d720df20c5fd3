#!/usr/bin/env node
// Drives walcast's live dashboard (`/`, src/http/dashboard.html) in headless Chromium for the
// integration test tests/dashboard.rs. Same style as driver.mjs: JSON commands on stdin, one per
// line; JSON events on stdout, one per line, nothing else.
//
//   node dashboard.mjs --url http://127.0.0.1:4000/ --user alice [--timeout-ms 10000]
//
// Options (`--name value`, `--name=value`, or the environment variable DASHBOARD_<NAME>):
//   --url         the dashboard's URL (required); the server must serve /demo.json
//   --user        a label of the `#user` picker: a demo user's name, or `service role` (required)
//   --timeout-ms  how long each wait may take (default 10000)
//   --width, --height  the viewport (default 1280 x 800)
// The browser is $CHROMIUM, else /usr/bin/chromium (Debian's package; `bash scripts/test-deps.sh`
// installs it and node_modules).
//
// Start-up: opens the page, waits for the picker to be filled from /demo.json, then picks
// `--user` in `#user` as a person would (Playwright's selectOption: `input` and `change` events).
// When `--user` is already the selected option it first picks another one and waits for that
// subscription, so the pick is always a real switch: re-selecting the current user re-sends an
// unchanged token, which the server ignores without a new "Subscribed" frame, and the page would
// stay at "switching to …". Then waits for `body[data-status=subscribed][data-user=<user>]` and
// for `body[data-synced=<user>]` (the page has merged its read of that user's orders) and prints
// {"ev":"subscribed","user":…}.
//
// Commands (each answered by exactly one event, or {"ev":"error","cmd":…,"message":…}):
//   {"cmd":"expect","order_number":"N","status":"in_progress"}  wait for the card (with that
//       data-status when `status` is given) -> {"ev":"seen","order_number","status","column",
//       "order_count","text"}; `column` is the data-code of the card's section.column
//   {"cmd":"absent","order_number":"N","ms":800}  watch `ms` for the card
//       -> {"ev":"absent","order_number","appeared":false|true}
//   {"cmd":"gone","order_number":"N"}   wait until the card is not in the page -> {"ev":"gone",…}
//   {"cmd":"switch","user":"dave"}  picks `user` in `#user` (`input` and `change` events) and, in
//       the same task, before anything else can run in the page, counts what is left
//       -> {"ev":"switched","user","log_count","order_count"}
//   {"cmd":"board"}  what the page shows now -> {"ev":"board","user","status","synced",
//       "orders":[{"id","order_number","status","dealership_id"}],
//       "log":[{"kind","order_id","dealership_id"}],
//       "health":{"connections","deliveries_per_second","lag_seconds","lag_bytes","text"}};
//       `synced` is the user whose read is merged ("" while reading), health values are the
//       strip's numbers as text (absent until /metrics has been read)
//   {"cmd":"view","dealership":"NORTH"}  picks the dealership with that code in `#dealership` (as a
//       person would) and waits for the presence state of its channel
//       -> {"ev":"viewing","dealership","id","viewer"}; `viewer` is this tab's presence key
//   {"cmd":"viewers","count":2,"users":["alice","bob"]}  waits until the presence list of the
//       viewed dealership shows `count` viewers (and, with `users`, exactly those names in any
//       order) -> {"ev":"viewers","count","viewers":[{"user","key","me"}]}
//   {"cmd":"ping"}  clicks "Ping the team" and waits for the page's own "sent" notice
//       -> {"ev":"pinged","text"}
//   {"cmd":"expect_ping","from":"alice"}  waits for a received ping notice from `from`
//       -> {"ev":"ping_seen","from","at","text","pings_received"}
//   {"cmd":"screenshot","path":"/abs/file.png"}  full-page PNG, animations finished -> {"ev":"screenshot","path","bytes"}
//   {"cmd":"close"}  closes the browser -> {"ev":"closed"}, exit 0 (EOF on stdin does the same)
// Unprompted events: {"ev":"console","level":"error"|"warning"|"pageerror",…} for the page's
// console errors and warnings and uncaught exceptions, {"ev":"error",…} for failures (start-up
// failures use "source":"start" and exit code 2).

import { existsSync, statSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { format } from 'node:util'

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n')
}

// Stdout belongs to the protocol.
for (const level of ['log', 'info', 'debug', 'trace', 'warn', 'error']) {
  console[level] = (...args) => process.stderr.write(`[dashboard.mjs ${level}] ${format(...args)}\n`)
}

function fail(message) {
  emit({ ev: 'error', source: 'start', message })
  process.exit(2)
}

function options() {
  const out = {}
  const args = process.argv.slice(2)
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]
    if (!arg.startsWith('--')) fail(`unexpected argument ${arg}`)
    const eq = arg.indexOf('=')
    if (eq > 0) {
      out[arg.slice(2, eq)] = arg.slice(eq + 1)
    } else {
      if (i + 1 >= args.length) fail(`${arg} needs a value`)
      out[arg.slice(2)] = args[++i]
    }
  }
  const get = (name, fallback) =>
    out[name] ?? process.env['DASHBOARD_' + name.toUpperCase().replace(/-/g, '_')] ?? fallback
  const number = (name, fallback) => {
    const value = Number(get(name, fallback))
    if (!Number.isFinite(value) || value <= 0) fail(`--${name} must be a positive number`)
    return value
  }
  const opts = {
    url: get('url'),
    user: get('user'),
    timeoutMs: number('timeout-ms', 10000),
    width: number('width', 1280),
    height: number('height', 800),
  }
  if (!opts.url) fail('--url is required')
  if (!opts.user) fail('--user is required')
  return opts
}

const opts = options()
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium'
if (!existsSync(executablePath)) {
  fail(`no Chromium at ${executablePath}: run \`bash scripts/test-deps.sh\` (installs Debian's chromium), or set CHROMIUM`)
}
let chromium
try {
  ;({ chromium } = await import('playwright-core'))
} catch (e) {
  fail(`cannot load playwright-core (${e.message}): run \`bash scripts/test-deps.sh\` to install tests/clients/node_modules`)
}

// A CSS attribute value, quoted.
const quoted = (value) => JSON.stringify(String(value))
const cardSelector = (orderNumber) => `article.card[data-order-number=${quoted(orderNumber)}]`

let browser
try {
  browser = await chromium.launch({ executablePath, args: ['--no-sandbox'], timeout: opts.timeoutMs * 3 })
} catch (e) {
  fail(`launching ${executablePath}: ${e.message}`)
}

async function shutdown(code) {
  try {
    await browser.close()
  } catch (e) {
    // already gone
  }
  process.exit(code)
}

const page = await browser.newPage({ viewport: { width: opts.width, height: opts.height } })
page.setDefaultTimeout(opts.timeoutMs)
page.on('console', (msg) => {
  const level = msg.type()
  if (level === 'error' || level === 'warning') {
    emit({ ev: 'console', level, text: msg.text(), location: msg.location() })
  }
})
page.on('pageerror', (err) => emit({ ev: 'console', level: 'pageerror', text: String(err?.message ?? err) }))
page.on('crash', () => emit({ ev: 'error', source: 'page', message: 'the page crashed' }))

async function waitSubscribedAs(label) {
  await page.waitForSelector(`body[data-status="subscribed"][data-user=${quoted(label)}][data-synced=${quoted(label)}]`, {
    state: 'attached',
  })
}

try {
  await page.goto(opts.url, { waitUntil: 'load' })
  // The picker is filled once /demo.json has been read.
  await page.waitForSelector('#user option', { state: 'attached' })
  const labels = await page.$$eval('#user option', (options) => options.map((o) => o.textContent))
  if (!labels.includes(opts.user)) throw new Error(`no option ${quoted(opts.user)} in #user: ${labels.join(', ')}`)
  const current = await page.$eval('#user', (select) => select.selectedOptions[0]?.textContent ?? null)
  if (current === opts.user) {
    // Make the pick a real switch (see the header).
    const other = labels.find((label) => label !== opts.user)
    await waitSubscribedAs(current)
    await page.selectOption('#user', { label: other })
    await waitSubscribedAs(other)
  }
  await page.selectOption('#user', { label: opts.user })
  await waitSubscribedAs(opts.user)
} catch (e) {
  const status = await page.evaluate(() => [document.body.dataset.status, document.getElementById('status')?.textContent]).catch(() => null)
  emit({ ev: 'error', source: 'start', message: `subscribing as ${opts.user}: ${e.message}`, page_status: status })
  await shutdown(2)
}
emit({ ev: 'subscribed', user: opts.user })

async function card(orderNumber) {
  const handle = await page.$(cardSelector(orderNumber))
  if (!handle) return null
  return handle.evaluate((el) => ({
    status: el.dataset.status,
    column: el.closest('section.column')?.dataset.code ?? null,
    order_count: Number(document.body.dataset.orderCount),
    text: el.innerText,
  }))
}

async function run(cmd) {
  switch (cmd.cmd) {
    case 'expect': {
      let selector = cardSelector(cmd.order_number)
      if (cmd.status !== undefined) selector += `[data-status=${quoted(cmd.status)}]`
      await page.waitForSelector(selector, { state: 'attached', timeout: cmd.ms ?? opts.timeoutMs })
      emit({ ev: 'seen', order_number: cmd.order_number, ...(await card(cmd.order_number)) })
      break
    }
    case 'absent': {
      let appeared = true
      try {
        await page.waitForSelector(cardSelector(cmd.order_number), { state: 'attached', timeout: cmd.ms ?? 800 })
      } catch (e) {
        if (e?.name !== 'TimeoutError') throw e
        appeared = false
      }
      emit({ ev: 'absent', order_number: cmd.order_number, appeared })
      break
    }
    case 'gone': {
      await page.waitForSelector(cardSelector(cmd.order_number), { state: 'detached', timeout: cmd.ms ?? opts.timeoutMs })
      const count = await page.evaluate(() => Number(document.body.dataset.orderCount))
      emit({ ev: 'gone', order_number: cmd.order_number, order_count: count })
      break
    }
    case 'switch': {
      const result = await page.evaluate((label) => {
        const select = document.getElementById('user')
        const option = [...select.options].find((o) => o.textContent === label)
        if (!option) return null
        select.value = option.value
        select.dispatchEvent(new Event('input', { bubbles: true }))
        select.dispatchEvent(new Event('change', { bubbles: true }))
        return {
          log_count: document.querySelectorAll('#log li').length,
          order_count: Number(document.body.dataset.orderCount),
        }
      }, cmd.user)
      if (!result) throw new Error(`no option ${quoted(cmd.user)} in #user`)
      emit({ ev: 'switched', user: cmd.user, ...result })
      break
    }
    case 'board': {
      const board = await page.evaluate(() => {
        const body = document.body
        const strip = document.getElementById('health')
        return {
          user: body.dataset.user ?? null,
          status: body.dataset.status ?? null,
          synced: body.dataset.synced ?? '',
          orders: [...document.querySelectorAll('article.card')].map((card) => ({
            id: card.dataset.orderId,
            order_number: card.dataset.orderNumber,
            status: card.dataset.status,
            dealership_id: card.closest('section.column')?.dataset.dealershipId ?? null,
          })),
          log: [...document.querySelectorAll('#log li')].map((li) => ({
            kind: li.querySelector('.ev')?.textContent ?? null,
            order_id: li.dataset.orderId ?? null,
            dealership_id: li.dataset.dealershipId ?? null,
          })),
          health: {
            connections: strip.dataset.connections,
            deliveries_per_second: strip.dataset.deliveriesPerSecond,
            lag_seconds: strip.dataset.lagSeconds,
            lag_bytes: strip.dataset.lagBytes,
            text: strip.innerText,
          },
        }
      })
      emit({ ev: 'board', ...board })
      break
    }
    case 'view': {
      const option = await page.$(`#dealership option[data-code=${quoted(cmd.dealership)}]`)
      if (!option) throw new Error(`no dealership ${quoted(cmd.dealership)} in #dealership`)
      const id = await option.evaluate((o) => o.value)
      await page.selectOption('#dealership', id)
      await page.waitForSelector(`body[data-viewing=${quoted(id)}][data-presence="synced"]`, { state: 'attached' })
      const viewer = await page.evaluate(() => document.querySelector('#viewers li.me')?.dataset.key ?? null)
      emit({ ev: 'viewing', dealership: cmd.dealership, id, viewer })
      break
    }
    case 'viewers': {
      const want = { count: cmd.count, users: cmd.users ? [...cmd.users].map(String).sort() : null }
      await page.waitForFunction(
        ({ count, users }) => {
          const body = document.body
          if (body.dataset.presence !== 'synced' || body.dataset.viewerCount !== String(count)) return false
          if (!users) return true
          const shown = [...document.querySelectorAll('#viewers li')].map((li) => li.dataset.user).sort()
          return JSON.stringify(shown) === JSON.stringify(users)
        },
        want,
        { timeout: cmd.ms ?? opts.timeoutMs },
      )
      const viewers = await page.$$eval('#viewers li', (items) =>
        items.map((li) => ({ user: li.dataset.user, key: li.dataset.key, me: li.classList.contains('me') })),
      )
      emit({ ev: 'viewers', count: viewers.length, viewers })
      break
    }
    case 'ping': {
      const before = await page.$$eval('#notices .notice.sent', (items) => items.length)
      await page.click('#ping:not([disabled])')
      await page.waitForFunction((n) => document.querySelectorAll('#notices .notice.sent').length > n, before)
      const text = await page.$eval('#notices .notice.sent', (n) => n.textContent)
      emit({ ev: 'pinged', text })
      break
    }
    case 'expect_ping': {
      const selector = `#notices .notice.received[data-from=${quoted(cmd.from)}]`
      await page.waitForSelector(selector, { state: 'attached', timeout: cmd.ms ?? opts.timeoutMs })
      const seen = await page.$eval(selector, (n) => ({
        at: n.dataset.at,
        text: n.textContent,
        pings_received: Number(document.body.dataset.pingsReceived),
      }))
      emit({ ev: 'ping_seen', from: cmd.from, ...seen })
      break
    }
    case 'screenshot': {
      if (!cmd.path) throw new Error('screenshot needs a path')
      await page.screenshot({ path: cmd.path, fullPage: true, animations: 'disabled' })
      emit({ ev: 'screenshot', path: cmd.path, bytes: statSync(cmd.path).size })
      break
    }
    case 'close':
      emit({ ev: 'closed' })
      await shutdown(0)
      break
    default:
      throw new Error(`unknown command ${quoted(cmd.cmd)}`)
  }
}

// Commands run strictly in order.
const lines = createInterface({ input: process.stdin })
let queue = Promise.resolve()
lines.on('line', (line) => {
  if (!line.trim()) return
  queue = queue.then(async () => {
    let cmd
    try {
      cmd = JSON.parse(line)
      await run(cmd)
    } catch (e) {
      emit({ ev: 'error', cmd: cmd?.cmd ?? null, message: e?.message ?? String(e) })
    }
  })
})
lines.on('close', () => {
  queue = queue.then(async () => {
    emit({ ev: 'closed' })
    await shutdown(0)
  })
})
