#!/usr/bin/env node
// TimescaleDB (PGlite WASM build) on the PostgreSQL wire protocol, for conformance tests only.
//
//   node serve.mjs [--port N] [--data DIR]      (env: AQUAMETER_TSDB_PORT, AQUAMETER_TSDB_DATA)
//
// --port 0 (the default) picks a free port; --data persists the database in DIR across restarts
// (default memory://, gone at exit). Prints one line `READY <url>` once it accepts connections, and
// stops cleanly (database flushed and closed) on SIGTERM or SIGINT.
//
// PGlite is ONE backend session: every client connection shares it (SET values, temp tables and
// prepared statement names leak between connections, so clients use prepare_threshold=None), and
// while one connection has a transaction open the others' messages wait until it ends.
import { mkdirSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { PGlite } from '@electric-sql/pglite'
import { timescaledb } from '@electric-sql/pglite/timescaledb'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.AQUAMETER_TSDB_PORT ?? '0' },
    data: { type: 'string', default: process.env.AQUAMETER_TSDB_DATA ?? 'memory://' },
    'max-connections': { type: 'string', default: '32' },
  },
})

if (!args.data.includes('://')) mkdirSync(args.data, { recursive: true })
const db = await PGlite.create({ dataDir: args.data, extensions: { timescaledb } })
// Stands in for shared_preload_libraries (which a real server needs, and which sql/migrate.py
// checks): the library must be in the session before any hypertable is touched. Without it, after
// a restart on an existing data dir, rows in compressed chunks silently vanish from queries (the
// planner hooks that read compressed chunks are not installed).
await db.exec("LOAD 'timescaledb'")

// The socket package accepts 1 connection by default; ingest alone holds two (writer and channel
// index reload) besides the test's own. They still take turns on the one backend.
const server = new PGLiteSocketServer({
  db,
  host: '127.0.0.1',
  port: Number(args.port),
  maxConnections: Number(args['max-connections']),
})

// --- COPY FROM STDIN --------------------------------------------------------------------------
// PGlite runs the backend only while it is handed input (one execProtocolRaw call); a COPY FROM
// STDIN query alone makes the backend wait for CopyData that can never arrive in the same call,
// and the session breaks (upstream pglite PR #1028). So for a simple-query COPY FROM STDIN we
// answer CopyInResponse ourselves, hold every message the client sends until CopyDone or
// CopyFail, then hand PGlite the query and all its data in one call. PGlite replies with its own
// CopyInResponse (dropped: the client already had ours), then CommandComplete or ErrorResponse
// and ReadyForQuery, exactly what the client waits for. Errors (a duplicate key, bad data, a
// CopyFail from the client) therefore abort the transaction like on a real server; they are
// reported at CopyDone rather than at the COPY statement. COPY in the extended protocol is not
// handled (libpq/psycopg send COPY as a simple query).
const COPY_FROM_STDIN = /^\s*copy\s[\s\S]*\bfrom\s+stdin\b/i
const BINARY_AFTER_STDIN = /\bstdin\b[\s\S]*\bbinary\b/i
const COLUMN_LIST = /^\s*copy\s+[^(]*?\(([^)]*)\)\s*from\s+stdin/i
const NOTHING = new Uint8Array(0)
const copying = new Map() // handler id -> messages of the COPY in progress, query first

function copyInResponse(sql) {
  // Overall format and per-column formats (0 text, 1 binary). Clients use the overall format;
  // the column count is known only from an explicit column list (0 otherwise, which libpq accepts).
  const format = BINARY_AFTER_STDIN.test(sql) ? 1 : 0
  const list = COLUMN_LIST.exec(sql)
  const ncols = list ? list[1].split(',').length : 0
  const msg = Buffer.alloc(1 + 4 + 1 + 2 + 2 * ncols)
  msg.write('G', 0)
  msg.writeInt32BE(msg.length - 1, 1)
  msg.writeInt8(format, 5)
  msg.writeInt16BE(ncols, 6)
  for (let i = 0; i < ncols; i++) msg.writeInt16BE(format, 8 + 2 * i)
  return new Uint8Array(msg)
}

function withoutCopyInResponse(reply) {
  const kept = []
  for (let at = 0; at < reply.length; ) {
    const end = at + 1 + Buffer.from(reply.buffer, reply.byteOffset).readInt32BE(at + 1)
    if (reply[at] !== 0x47 /* 'G' */) kept.push(reply.subarray(at, end))
    at = end
  }
  return new Uint8Array(Buffer.concat(kept))
}

// The socket package hands each complete client message to its query queue (handler id,
// message); wrapping enqueue is the one place that sees both. Pinned package version: see
// package-lock.json before upgrading.
const queue = server.queryQueue
const enqueue = queue.enqueue.bind(queue)
queue.enqueue = async (handlerId, message) => {
  const held = copying.get(handlerId)
  if (held) {
    held.push(message) // CopyData, and Flush/Sync which a real backend ignores during COPY
    const type = String.fromCharCode(message[0])
    if (type !== 'c' && type !== 'f') return NOTHING
    copying.delete(handlerId)
    return withoutCopyInResponse(await enqueue(handlerId, Buffer.concat(held)))
  }
  if (message[0] === 0x51 /* 'Q' */) {
    const sql = Buffer.from(message.subarray(5, message.length - 1)).toString('utf8')
    if (COPY_FROM_STDIN.test(sql)) {
      copying.set(handlerId, [message])
      return copyInResponse(sql)
    }
  }
  return enqueue(handlerId, message)
}
// A client that disconnects in the middle of a COPY leaves nothing behind.
const clearHandler = queue.clearQueueForHandler.bind(queue)
queue.clearQueueForHandler = (handlerId) => {
  copying.delete(handlerId)
  clearHandler(handlerId)
}

await server.start()
const { port } = server.server.address()
// Any password is accepted; sslmode=disable because the socket package does not answer an
// SSLRequest (a client that tries TLS first would wait forever).
console.log(`READY postgresql://postgres:postgres@127.0.0.1:${port}/postgres?sslmode=disable`)

let stopping = false
async function stop() {
  if (stopping) return
  stopping = true
  await server.stop()
  await db.close() // flushes the data dir
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
