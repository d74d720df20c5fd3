#!/usr/bin/env node
// Drives one official Supabase Realtime JavaScript client for walcast's integration tests.
//
// Line protocol (see README.md in this directory): JSON commands on stdin, one per line;
// JSON events on stdout, one per line. Nothing else is ever written to stdout: the
// libraries' console output is captured and forwarded as events.
//
// Options (command line `--name value` or `--name=value`, else environment variable):
//   --url        DRIVER_URL        base URL, e.g. http://127.0.0.1:4000 (required)
//   --key        DRIVER_KEY        the apikey (a JWT) (required)
//   --vsn        DRIVER_VSN        1.0.0 | 2.0.0 (default 2.0.0; realtime-js-old: 1.0.0 only)
//   --client     DRIVER_CLIENT     supabase-js (default) | realtime-js-old
//   --auth       DRIVER_AUTH       supabase-js only: callback (default) | plain
//   --transport  DRIVER_TRANSPORT  ws (default) | native
//   --heartbeat-ms DRIVER_HEARTBEAT_MS  heartbeat interval (library default 25000)
//   --timeout-ms DRIVER_TIMEOUT_MS push/join timeout (library default 10000)
//   --log        DRIVER_LOG        on (default) | off: forward the library logger as {"ev":"log"}

import { createRequire } from 'node:module'
import { createInterface } from 'node:readline'
import { format } from 'node:util'

const require = createRequire(import.meta.url)

// ---------------------------------------------------------------- output

function safeValue(value, depth = 0) {
  if (value === null || value === undefined) return value ?? null
  if (typeof value === 'bigint') return value.toString()
  if (typeof value !== 'object') return value
  if (depth > 8) return '[depth]'
  if (value instanceof Error) {
    const out = { name: value.name, message: value.message }
    if (value.cause !== undefined) out.cause = safeValue(value.cause, depth + 1)
    if (value.code !== undefined) out.code = value.code
    return out
  }
  if (value instanceof ArrayBuffer || ArrayBuffer.isView(value)) {
    return { binary: Buffer.from(value.buffer ?? value).toString('base64') }
  }
  // DOM-style events (CloseEvent, ErrorEvent) from either transport.
  if (typeof value.type === 'string' && ('target' in value || 'wasClean' in value)) {
    const out = { type: value.type }
    for (const k of ['code', 'reason', 'wasClean', 'message']) {
      if (value[k] !== undefined) out[k] = value[k]
    }
    if (value.error !== undefined) out.error = safeValue(value.error, depth + 1)
    return out
  }
  if (Array.isArray(value)) return value.map((v) => safeValue(v, depth + 1))
  const out = {}
  for (const [k, v] of Object.entries(value)) {
    if (typeof v === 'function') continue
    out[k] = safeValue(v, depth + 1)
  }
  return out
}

function emit(event) {
  let line
  try {
    line = JSON.stringify(event)
  } catch (e) {
    line = JSON.stringify({ ev: 'error', message: `unserializable event: ${e.message}`, event: String(event.ev) })
  }
  process.stdout.write(line + '\n')
}

function emitError(message, extra = {}) {
  emit({ ev: 'error', message, ...extra })
}

// The libraries print through console.*; stdout belongs to the protocol.
for (const level of ['log', 'info', 'debug', 'trace']) {
  console[level] = (...args) => emit({ ev: 'log', source: 'console', level, msg: format(...args) })
}
console.warn = (...args) => emit({ ev: 'log', source: 'console', level: 'warn', msg: format(...args) })
console.error = (...args) => emitError(format(...args), { source: 'console' })

process.on('uncaughtException', (e) => emitError(`uncaught exception: ${e?.message ?? e}`, { source: 'uncaught', detail: safeValue(e) }))
process.on('unhandledRejection', (e) => emitError(`unhandled rejection: ${e?.message ?? e}`, { source: 'uncaught', detail: safeValue(e) }))

// ---------------------------------------------------------------- options

function parseOptions(argv) {
  const opts = {}
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]
    if (!arg.startsWith('--')) throw new Error(`unexpected argument ${arg}`)
    const eq = arg.indexOf('=')
    if (eq > 0) {
      opts[arg.slice(2, eq)] = arg.slice(eq + 1)
    } else {
      if (i + 1 >= argv.length) throw new Error(`missing value for ${arg}`)
      opts[arg.slice(2)] = argv[++i]
    }
  }
  const get = (name, env, dflt) => opts[name] ?? process.env[env] ?? dflt
  const known = ['url', 'key', 'vsn', 'client', 'auth', 'transport', 'heartbeat-ms', 'timeout-ms', 'log']
  for (const name of Object.keys(opts)) {
    if (!known.includes(name)) throw new Error(`unknown option --${name}`)
  }
  const o = {
    url: get('url', 'DRIVER_URL'),
    key: get('key', 'DRIVER_KEY'),
    client: get('client', 'DRIVER_CLIENT', 'supabase-js'),
    auth: get('auth', 'DRIVER_AUTH', 'callback'),
    transport: get('transport', 'DRIVER_TRANSPORT', 'ws'),
    heartbeatMs: get('heartbeat-ms', 'DRIVER_HEARTBEAT_MS'),
    timeoutMs: get('timeout-ms', 'DRIVER_TIMEOUT_MS'),
    log: get('log', 'DRIVER_LOG', 'on'),
  }
  o.vsn = get('vsn', 'DRIVER_VSN', o.client === 'realtime-js-old' ? '1.0.0' : '2.0.0')
  if (!o.url) throw new Error('--url (or DRIVER_URL) is required')
  if (!o.key) throw new Error('--key (or DRIVER_KEY) is required')
  if (!['supabase-js', 'realtime-js-old'].includes(o.client)) throw new Error(`unknown client ${o.client}`)
  if (!['1.0.0', '2.0.0'].includes(o.vsn)) throw new Error(`unknown vsn ${o.vsn}`)
  if (o.client === 'realtime-js-old' && o.vsn !== '1.0.0') {
    throw new Error('realtime-js-old (2.80.0) speaks vsn 1.0.0 only')
  }
  if (!['callback', 'plain'].includes(o.auth)) throw new Error(`unknown auth mode ${o.auth}`)
  if (!['ws', 'native'].includes(o.transport)) throw new Error(`unknown transport ${o.transport}`)
  if (!['on', 'off'].includes(o.log)) throw new Error(`--log must be on or off`)
  for (const k of ['heartbeatMs', 'timeoutMs']) {
    if (o[k] !== undefined) {
      o[k] = Number(o[k])
      if (!Number.isInteger(o[k]) || o[k] <= 0) throw new Error(`${k} must be a positive integer`)
    }
  }
  return o
}

// ---------------------------------------------------------------- client

function transportFor(name) {
  if (name === 'ws') return require('ws')
  if (typeof globalThis.WebSocket !== 'function') {
    throw new Error('no global WebSocket: use Node 22+, or node --experimental-websocket on Node 20, or --transport ws')
  }
  return globalThis.WebSocket
}

function makeLogger(enabled) {
  return (kind, msg, data) => {
    if (kind === 'error') {
      emitError(String(msg), { source: 'logger', data: safeValue(data) })
    } else if (enabled) {
      emit({ ev: 'log', source: 'logger', kind, msg: String(msg), data: safeValue(data) })
    }
  }
}

function createDriverClient(o) {
  const transport = transportFor(o.transport)
  const realtimeOptions = { logger: makeLogger(o.log === 'on'), transport }
  if (o.heartbeatMs) realtimeOptions.heartbeatIntervalMs = o.heartbeatMs
  if (o.timeoutMs) realtimeOptions.timeout = o.timeoutMs

  if (o.client === 'realtime-js-old') {
    const { RealtimeClient } = require('realtime-js-2-80')
    const version = require('realtime-js-2-80/package.json').version
    const endpoint = o.url.replace(/\/+$/, '').replace(/^http/i, 'ws') + '/realtime/v1'
    const realtime = new RealtimeClient(endpoint, { ...realtimeOptions, params: { apikey: o.key } })
    return {
      version,
      realtime,
      channel: (topic, opts) => realtime.channel(topic, opts),
      setAuth: (token) => realtime.setAuth(token),
      removeAllChannels: () => realtime.removeAllChannels(),
      // 2.80's removeAllChannels() disconnects without waiting.
      disconnect: async () => realtime.disconnect(),
      onSocket: (state, cb) => realtime.stateChangeCallbacks[state].push(cb),
    }
  }

  const { createClient } = require('@supabase/supabase-js')
  const version = require('@supabase/supabase-js/package.json').version
  const options = {
    realtime: { ...realtimeOptions, vsn: o.vsn },
    auth: { persistSession: false, autoRefreshToken: false, detectSessionInUrl: false },
  }
  // "callback": the way a signed-in app behaves. supabase-js always hands realtime-js an
  // accessToken callback (the session JWT, else the apikey) and re-reads it on every heartbeat
  // and after each join, so a token must come from there to stick. Signed out = null here,
  // which supabase-js turns into the apikey, exactly like an app without a session.
  let currentToken = null
  if (o.auth === 'callback') options.accessToken = async () => currentToken
  const supabase = createClient(o.url, o.key, options)
  const realtime = supabase.realtime
  return {
    version,
    realtime,
    channel: (topic, opts) => supabase.channel(topic, opts),
    setAuth: async (token) => {
      if (o.auth === 'callback') currentToken = token ?? null
      await realtime.setAuth(token ?? null)
    },
    removeAllChannels: () => supabase.removeAllChannels(),
    disconnect: () => realtime.disconnect(),
    onSocket: (state, cb) => {
      const adapter = realtime.socketAdapter
      const hook = { open: 'onOpen', close: 'onClose', error: 'onError' }[state]
      adapter[hook](cb)
    },
  }
}

// ---------------------------------------------------------------- commands

const channels = new Map() // handle -> RealtimeChannel

function statusEvent(handle, status, err) {
  const ev = { ev: 'status', channel: handle, status }
  if (err !== undefined && err !== null) {
    ev.error = err instanceof Error ? err.message : typeof err === 'string' ? err : JSON.stringify(safeValue(err))
    if (err instanceof Error && err.cause !== undefined) ev.cause = safeValue(err.cause)
  }
  emit(ev)
}

async function subscribe(client, cmd) {
  const handle = cmd.channel
  if (typeof handle !== 'string' || !handle) throw new Error('subscribe needs "channel"')
  if (channels.has(handle)) throw new Error(`channel ${handle} already exists`)
  const bindings = cmd.bindings ?? []
  if (!Array.isArray(bindings)) throw new Error('"bindings" must be an array')
  if (cmd.token !== undefined) await client.setAuth(cmd.token)
  const chan = client.channel(cmd.topic ?? handle)
  bindings.forEach((binding, index) => {
    chan.on('postgres_changes', binding, (payload) => {
      emit({ ev: 'change', channel: handle, binding: index, payload })
    })
  })
  chan.on('system', {}, (payload) => emit({ ev: 'system', channel: handle, payload }))
  channels.set(handle, chan)
  chan.subscribe((status, err) => statusEvent(handle, status, err))
}

// A broadcast channel: `config.broadcast` {self, ack} as given; every
// broadcast received is emitted as {ev:'broadcast', channel, message}.
async function broadcastSubscribe(client, cmd) {
  const handle = cmd.channel
  if (typeof handle !== 'string' || !handle) throw new Error('broadcast_subscribe needs "channel"')
  if (channels.has(handle)) throw new Error(`channel ${handle} already exists`)
  if (cmd.token !== undefined) await client.setAuth(cmd.token)
  const config = { broadcast: { self: !!cmd.self, ack: !!cmd.ack } }
  if (cmd.private) config.private = true
  if (cmd.replay) config.broadcast.replay = cmd.replay
  const chan = client.channel(cmd.topic ?? handle, { config })
  chan.on('broadcast', { event: '*' }, (message) => emit({ ev: 'broadcast', channel: handle, message: safeValue(message) }))
  chan.on('system', {}, (payload) => emit({ ev: 'system', channel: handle, payload }))
  channels.set(handle, chan)
  chan.subscribe((status, err) => statusEvent(handle, status, err))
}

// channel.send({type:'broadcast', event, payload}) as apps call it; emits
// {ev:'sent', channel, result} with what the promise resolved to.
async function broadcastSend(client, cmd) {
  const chan = channels.get(cmd.channel)
  if (!chan) throw new Error(`no channel ${cmd.channel}`)
  const result = await chan.send({ type: 'broadcast', event: cmd.event, payload: cmd.payload })
  emit({ ev: 'sent', channel: cmd.channel, result })
}

// A channel that is created and never joined (`config.private` as given):
// its send() falls back to the REST batch, and httpSend() needs no join.
async function channelOnly(client, cmd) {
  const handle = cmd.channel
  if (typeof handle !== 'string' || !handle) throw new Error('channel needs "channel"')
  if (channels.has(handle)) throw new Error(`channel ${handle} already exists`)
  channels.set(handle, client.channel(cmd.topic ?? handle, { config: { private: !!cmd.private } }))
}

// channel.httpSend(event, payload) (payload: cmd.payload, or the bytes of
// base64 cmd.binary as an ArrayBuffer); emits {ev:'http_sent', channel,
// result} when it resolves, {ev:'http_sent', channel, error} when it rejects.
async function httpSend(client, cmd) {
  const chan = channels.get(cmd.channel)
  if (!chan) throw new Error(`no channel ${cmd.channel}`)
  let payload = cmd.payload
  if (typeof cmd.binary === 'string') {
    const bytes = Buffer.from(cmd.binary, 'base64')
    payload = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength)
  }
  try {
    const result = await chan.httpSend(cmd.event, payload)
    emit({ ev: 'http_sent', channel: cmd.channel, result })
  } catch (e) {
    emit({ ev: 'http_sent', channel: cmd.channel, error: e?.message ?? String(e) })
  }
}

// A presence channel: `config.presence.key` as given (absent: the server
// picks one). With `listen` (default true) sync/join/leave listeners are
// attached (realtime-js then enables presence); each event is emitted as
// {ev:'presence', channel, kind, key?, presences?, state} where state is
// presenceState() after the event.
async function presenceSubscribe(client, cmd) {
  const handle = cmd.channel
  if (typeof handle !== 'string' || !handle) throw new Error('presence_subscribe needs "channel"')
  if (channels.has(handle)) throw new Error(`channel ${handle} already exists`)
  if (cmd.token !== undefined) await client.setAuth(cmd.token)
  const config = {}
  if (cmd.key !== undefined) config.presence = { key: cmd.key }
  if (cmd.private) config.private = true
  const chan = client.channel(cmd.topic ?? handle, { config })
  if (cmd.listen !== false) {
    const report = (kind, extra) =>
      emit({ ev: 'presence', channel: handle, kind, ...extra, state: safeValue(chan.presenceState()) })
    chan.on('presence', { event: 'sync' }, () => report('sync', {}))
    chan.on('presence', { event: 'join' }, ({ key, newPresences }) =>
      report('join', { key, presences: safeValue(newPresences) }))
    chan.on('presence', { event: 'leave' }, ({ key, leftPresences }) =>
      report('leave', { key, presences: safeValue(leftPresences) }))
  }
  chan.on('system', {}, (payload) => emit({ ev: 'system', channel: handle, payload }))
  channels.set(handle, chan)
  chan.subscribe((status, err) => statusEvent(handle, status, err))
}

// track(payload) / untrack(); emits {ev:'tracked'|'untracked', channel, result}.
async function presenceCall(client, cmd, what) {
  const chan = channels.get(cmd.channel)
  if (!chan) throw new Error(`no channel ${cmd.channel}`)
  const result = what === 'track' ? await chan.track(cmd.payload) : await chan.untrack()
  emit({ ev: `${what}ed`, channel: cmd.channel, result })
}

async function unsubscribe(client, cmd) {
  const chan = channels.get(cmd.channel)
  if (!chan) throw new Error(`no channel ${cmd.channel}`)
  channels.delete(cmd.channel)
  // removeChannel = unsubscribe (phx_leave, wait for the reply) + teardown, as apps do.
  const result = await client.realtime.removeChannel(chan)
  emit({ ev: 'unsubscribed', channel: cmd.channel, result })
}

function state(client) {
  const out = { ev: 'state', connection: client.realtime.connectionState(), channels: {} }
  for (const [handle, chan] of channels) out.channels[handle] = chan.state
  if (typeof client.realtime.accessTokenValue !== 'undefined') out.accessToken = client.realtime.accessTokenValue
  return out
}

let closing = false

async function close(client, code = 0) {
  if (closing) return
  closing = true
  const deadline = setTimeout(() => {
    emitError('close did not finish in time')
    process.exit(code || 1)
  }, 20000)
  try {
    if (channels.size > 0) {
      const results = await client.removeAllChannels()
      channels.clear()
      emit({ ev: 'unsubscribed', channel: '*', result: results })
    }
    await client.disconnect()
  } catch (e) {
    emitError(`close: ${e?.message ?? e}`)
  }
  clearTimeout(deadline)
  emit({ ev: 'closed' })
  process.stdout.write('', () => process.exit(code))
}

async function run(client, cmd) {
  switch (cmd.cmd) {
    case 'subscribe':
      return subscribe(client, cmd)
    case 'unsubscribe':
      return unsubscribe(client, cmd)
    case 'broadcast_subscribe':
      return broadcastSubscribe(client, cmd)
    case 'broadcast_send':
      return broadcastSend(client, cmd)
    case 'channel':
      return channelOnly(client, cmd)
    case 'http_send':
      return httpSend(client, cmd)
    case 'presence_subscribe':
      return presenceSubscribe(client, cmd)
    case 'track':
      return presenceCall(client, cmd, 'track')
    case 'untrack':
      return presenceCall(client, cmd, 'untrack')
    case 'presence_state':
      return emit({ ev: 'presence_state', channel: cmd.channel, state: safeValue(channels.get(cmd.channel)?.presenceState()) })
    case 'setAuth':
      return client.setAuth(cmd.token ?? null)
    case 'connect':
      return client.realtime.connect()
    case 'heartbeat':
      return client.realtime.sendHeartbeat()
    case 'state':
      return emit(state(client))
    case 'close':
      return close(client)
    default:
      throw new Error(`unknown command ${JSON.stringify(cmd.cmd)}`)
  }
}

// ---------------------------------------------------------------- main

let options, client
try {
  options = parseOptions(process.argv.slice(2))
  client = createDriverClient(options)
} catch (e) {
  emitError(`start: ${e.message}`, { source: 'start' })
  process.exit(2)
}

for (const s of ['open', 'close', 'error']) {
  client.onSocket(s, (event) => {
    const ev = { ev: 'socket', state: s }
    if (event !== undefined) ev.detail = safeValue(event)
    emit(ev)
  })
}

emit({
  ev: 'ready',
  driver: 'node',
  client: options.client,
  version: client.version,
  vsn: options.vsn,
  auth: options.client === 'supabase-js' ? options.auth : 'plain',
  transport: options.transport,
  endpoint: client.realtime.endpointURL(),
  node: process.version,
})

// Commands run strictly one after another; each ends with {"ev":"ok"} (or an error event) once
// it has been handed to the library (subscribe: the join is sent or queued, not yet answered).
const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
let queue = Promise.resolve()
lines.on('line', (line) => {
  if (!line.trim()) return
  queue = queue.then(async () => {
    let cmd
    try {
      cmd = JSON.parse(line)
    } catch (e) {
      return emitError(`bad command line: ${e.message}`, { source: 'command', line })
    }
    if (cmd === null || typeof cmd !== 'object' || Array.isArray(cmd)) {
      return emitError('bad command line: not a JSON object', { source: 'command', line })
    }
    try {
      await run(client, cmd)
      if (cmd.cmd !== 'close') emit({ ev: 'ok', cmd: cmd.cmd, ...(cmd.id !== undefined ? { id: cmd.id } : {}) })
    } catch (e) {
      emitError(`${cmd.cmd}: ${e?.message ?? e}`, { source: 'command', cmd: cmd.cmd, ...(cmd.id !== undefined ? { id: cmd.id } : {}) })
    }
  })
})
// stdin closed (the test dropped its handle): behave like {"cmd":"close"}.
lines.on('close', () => {
  queue = queue.then(() => close(client))
})
