// The simulated network's ceiling for a client outside Python: a bare Node client (global fetch, i.e.
// Node's built-in undici) fetching the same requests as the daemon's list mode, and nothing else.
//
//   node bench/bare.mjs --urls simnet.json --collection NSID [--workers 16] [--page-size 100]
//                       [--discovery-page-size 1000] [--mode list|warm-repos] [--keep-going]
//
// --mode list (the default) does what a list-mode discovery run does on the wire: one task pages the
// relay's listReposByCollection and hands DIDs out as pages arrive (through a channel as deep as the
// worker count, like bench/bare.py's trio channel); --workers tasks each take a DID, fetch its PLC
// document, take its PDS endpoint and page listRecords to the end, following cursors. Every body is read
// whole and JSON.parse'd (the cursor and the PDS are needed); nothing is validated or stored.
// --mode warm-repos fetches, instead of the listRecords pages, one com.atproto.sync.getLatestCommit per
// DID: the simulated network builds every account's signed repo on first use, so this warms its repo
// cache before verified-mode runs (a warm-up, not a measurement). With --keep-going a DID whose requests
// fail (a hostile account) is counted in `errors` and skipped instead of ending the run (warm-ups of the
// hostile network only).
//
// Only Node's standard library: no npm packages. Node's fetch keeps connections alive and opens as many
// per origin as there are requests in flight (at most --workers here), so the client is never throttled
// by its own pools. Prints one JSON object on stdout: wall seconds, requests by kind, records, pages,
// records/s, pages/s, this process's CPU seconds (process.cpuUsage()) over the fetch, and its peak RSS.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

const LIST_REPOS = "/xrpc/com.atproto.sync.listReposByCollection";
const LIST_RECORDS = "/xrpc/com.atproto.repo.listRecords";
const GET_LATEST_COMMIT = "/xrpc/com.atproto.sync.getLatestCommit";

const { values: args } = parseArgs({
  options: {
    urls: { type: "string" },
    collection: { type: "string" },
    workers: { type: "string", default: "16" },
    "page-size": { type: "string", default: "100" },
    "discovery-page-size": { type: "string", default: "1000" },
    mode: { type: "string", default: "list" },
    "keep-going": { type: "boolean", default: false },
  },
});
if (!args.urls || !args.collection || !["list", "warm-repos"].includes(args.mode)) {
  process.stderr.write(
    "usage: node bench/bare.mjs --urls simnet.json --collection NSID [--workers N] [--page-size N] " +
      "[--discovery-page-size N] [--mode list|warm-repos] [--keep-going]\n",
  );
  process.exit(2);
}
const urls = JSON.parse(readFileSync(args.urls, "utf8"));
const workers = Number(args.workers);
const pageSize = Number(args["page-size"]);
const discoveryPageSize = Number(args["discovery-page-size"]);
const collection = args.collection;

const counts = { relay: 0, plc: 0, pages: 0, records: 0, sync: 0, errors: 0 };

/** A bounded channel: send() waits while `capacity` items are queued; receive() returns DONE once closed
 * and empty. */
const DONE = Symbol("done");
class Channel {
  constructor(capacity) {
    this.capacity = capacity;
    this.items = [];
    this.senders = [];
    this.receivers = [];
    this.closed = false;
  }
  async send(item) {
    while (this.items.length >= this.capacity) {
      await new Promise((resolve) => this.senders.push(resolve));
    }
    this.items.push(item);
    this.receivers.shift()?.();
  }
  async receive() {
    while (this.items.length === 0) {
      if (this.closed) return DONE;
      await new Promise((resolve) => this.receivers.push(resolve));
    }
    const item = this.items.shift();
    this.senders.shift()?.();
    return item;
  }
  close() {
    this.closed = true;
    for (const wake of this.receivers.splice(0)) wake();
  }
}

/** GET `url` and JSON.parse its whole body; any status but 2xx is an error. */
async function getJson(url) {
  const response = await fetch(url);
  const text = await response.text();
  if (!response.ok) throw new Error(`GET ${url}: HTTP ${response.status}: ${text.slice(0, 200)}`);
  return JSON.parse(text);
}

function query(params) {
  return new URLSearchParams(params).toString();
}

function pdsEndpoint(did, document) {
  for (const service of document.service ?? []) {
    if (service.id === "#atproto_pds" || service.id === `${did}#atproto_pds`) {
      return String(service.serviceEndpoint).replace(/\/+$/, "");
    }
  }
  throw new Error(`no PDS in the document of ${did}`);
}

async function discover(channel) {
  try {
    let cursor = null;
    for (;;) {
      const params = { collection, limit: String(discoveryPageSize) };
      if (cursor) params.cursor = cursor;
      const body = await getJson(`${urls.relay_url}${LIST_REPOS}?${query(params)}`);
      counts.relay += 1;
      for (const repo of body.repos) await channel.send(repo.did);
      cursor = body.cursor;
      if (!cursor) return;
    }
  } finally {
    channel.close();
  }
}

async function backfill(channel) {
  for (;;) {
    const did = await channel.receive();
    if (did === DONE) return;
    if (!args["keep-going"]) {
      await backfillOne(did);
      continue;
    }
    try {
      await backfillOne(did);
    } catch {
      counts.errors += 1;
    }
  }
}

/** One DID: its PLC document, then every listRecords page (or one getLatestCommit with warm-repos). */
async function backfillOne(did) {
  counts.plc += 1;
  const pds = pdsEndpoint(did, await getJson(`${urls.plc_url}/${did}`));
  if (args.mode === "warm-repos") {
    counts.sync += 1;
    await getJson(`${pds}${GET_LATEST_COMMIT}?${query({ did })}`);
    return;
  }
  let cursor = null;
  for (;;) {
    const params = { repo: did, collection, limit: String(pageSize) };
    if (cursor) params.cursor = cursor;
    counts.pages += 1;
    const page = await getJson(`${pds}${LIST_RECORDS}?${query(params)}`);
    counts.records += page.records.length;
    cursor = page.cursor;
    if (!cursor) return;
  }
}

async function main() {
  const channel = new Channel(workers);
  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  const tasks = [discover(channel)];
  for (let i = 0; i < workers; i += 1) tasks.push(backfill(channel));
  await Promise.all(tasks);
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  const requests = counts.relay + counts.plc + counts.pages + counts.sync;
  const result = {
    client: "node",
    fetch: "global fetch (undici)",
    node: process.version,
    mode: args.mode,
    workers,
    seconds,
    cpu_seconds: (cpu.user + cpu.system) / 1e6,
    cpu_user_seconds: cpu.user / 1e6,
    cpu_system_seconds: cpu.system / 1e6,
    relay_requests: counts.relay,
    plc_requests: counts.plc,
    sync_requests: counts.sync,
    errors: counts.errors,
    pages: counts.pages,
    records: counts.records,
    requests,
    records_per_s: counts.records / seconds,
    pages_per_s: counts.pages / seconds,
    requests_per_s: requests / seconds,
    peak_rss_bytes: process.resourceUsage().maxRSS * 1024,
  };
  process.stdout.write(JSON.stringify(result) + "\n");
}

main().catch((error) => {
  process.stderr.write(`bare.mjs: ${error?.stack ?? error}\n`);
  process.exit(1);
});
