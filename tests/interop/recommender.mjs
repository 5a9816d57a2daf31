// The recommender's side of oo-ml, with the recommender's own stack: @grpc/grpc-js and
// @grpc/proto-loader for ScoringService, @nats-io/jetstream for the events, protobufjs for
// binary envelopes. Every .proto comes from the repo's proto/ folder.
//
//   node recommender.mjs <scenario> --grpc HOST:PORT --nats nats://HOST:PORT --proto DIR
//   (or OO_INTEROP_GRPC, OO_INTEROP_NATS, OO_INTEROP_PROTO)
//
// Scenarios: grpc, events-binary, events-json. Prints one JSON summary line and exits 0
// when every check passed; otherwise prints the failed check to stderr and exits 1.

import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { parseArgs } from "node:util";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { jetstream, jetstreamManager } from "@nats-io/jetstream";
import { headers as natsHeaders, connect } from "@nats-io/transport-node";
import protobuf from "protobufjs";

const SCENARIOS = ["grpc", "events-binary", "events-json"];
const POLL_WITHIN_MS = 15_000;
const RPC_DEADLINE_MS = 5_000;

// --- arguments --------------------------------------------------------------------------

const { values: opts, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    grpc: { type: "string", default: process.env.OO_INTEROP_GRPC },
    nats: { type: "string", default: process.env.OO_INTEROP_NATS },
    proto: { type: "string", default: process.env.OO_INTEROP_PROTO },
  },
});
const scenario = positionals[0];
if (!SCENARIOS.includes(scenario) || !opts.grpc || !opts.proto) {
  console.error(
    `usage: node recommender.mjs <${SCENARIOS.join("|")}> --grpc HOST:PORT --nats URL --proto DIR`,
  );
  process.exit(2);
}
if (scenario.startsWith("events") && !opts.nats) {
  console.error(`scenario ${scenario} needs --nats URL (or OO_INTEROP_NATS)`);
  process.exit(2);
}
const PROTO_DIR = path.resolve(opts.proto);
// A fresh user per run, so every count below is exact.
const RUN = `${process.pid}-${Date.now().toString(36)}`;

// --- gRPC, as the recommender loads it ---------------------------------------------------

const packageDefinition = protoLoader.loadSync("oo/scoring/v1/scoring.proto", {
  includeDirs: [PROTO_DIR],
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const scoringPkg = grpc.loadPackageDefinition(packageDefinition).oo.scoring.v1;
const client = new scoringPkg.ScoringService(opts.grpc, grpc.credentials.createInsecure());

function call(method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + RPC_DEADLINE_MS);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function callFails(method, request) {
  try {
    const response = await call(method, request);
    assert.fail(`${method} should have failed, answered ${JSON.stringify(response)}`);
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    return err;
  }
}

// --- protobufjs: envelopes and google.rpc.Status ----------------------------------------

const require = createRequire(import.meta.url);
const PROTOBUFJS_DIR = path.dirname(require.resolve("protobufjs/package.json"));

function loadRoot(file) {
  const root = new protobuf.Root();
  // Our imports from proto/; google/protobuf/descriptor.proto from protobufjs (the other
  // well-known types are bundled in protobufjs and resolve by name).
  root.resolvePath = (_origin, target) => {
    for (const dir of [PROTO_DIR, PROTOBUFJS_DIR]) {
      const candidate = path.join(dir, target);
      if (existsSync(candidate)) return candidate;
    }
    return target;
  };
  root.loadSync(file);
  root.resolveAll();
  return root;
}

// The part of google/rpc/status.proto and error_details.proto a client needs.
const RPC_TYPES = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message BadRequest {
    message FieldViolation { string field = 1; string description = 2; }
    repeated FieldViolation field_violations = 1;
  }
`).root;

function fieldViolations(err) {
  const [raw] = err.metadata.get("grpc-status-details-bin");
  assert.ok(Buffer.isBuffer(raw), "the error carries no grpc-status-details-bin trailer");
  const status = RPC_TYPES.lookupType("google.rpc.Status").decode(raw);
  assert.equal(status.code, grpc.status.INVALID_ARGUMENT, "Status.code in the details trailer");
  const badRequest = RPC_TYPES.lookupType("google.rpc.BadRequest");
  const out = {};
  for (const any of status.details) {
    if (any.typeUrl !== "type.googleapis.com/google.rpc.BadRequest") continue;
    for (const v of badRequest.decode(any.value).fieldViolations) out[v.field] = v.description;
  }
  return out;
}

// --- shared checks -----------------------------------------------------------------------

const DECIMAL = /^\d+$/; // uint64 with longs: String

function featureMap(features) {
  assert.ok(Array.isArray(features), "features is an array");
  const out = {};
  for (const f of features) {
    assert.equal(typeof f.name, "string");
    assert.equal(typeof f.value, "number", `features[${f.name}].value is a number`);
    assert.match(f.origin, /^FEATURE_ORIGIN_[A-Z_]+$/, `features[${f.name}].origin is an enum name`);
    out[f.name] = { value: f.value, origin: f.origin };
  }
  return out;
}

async function score(userId, candidates, extra = {}) {
  const resp = await call("Score", { userId, candidates, ...extra });
  assert.equal(typeof resp.decisionId, "string");
  assert.ok(resp.decisionId.length > 0, "decisionId is set");
  assert.ok(
    candidates.some((c) => c.tipId === resp.chosenTipId),
    `chosenTipId ${resp.chosenTipId} is a candidate`,
  );
  assert.equal(resp.ranking.length, candidates.length, "every candidate is ranked");
  assert.equal(resp.ranking[0].tipId, resp.chosenTipId, "the chosen tip ranks first");
  let propensities = 0;
  for (const r of resp.ranking) {
    assert.equal(typeof r.tipId, "string");
    assert.equal(typeof r.score, "number");
    assert.ok(Number.isFinite(r.score), `ranking[${r.tipId}].score is finite`);
    assert.equal(typeof r.propensity, "number");
    assert.ok(r.propensity >= 0 && r.propensity <= 1, `propensity ${r.propensity} in [0, 1]`);
    assert.equal(r.arm, candidates.find((c) => c.tipId === r.tipId).arm, "ranking[].arm");
    propensities += r.propensity;
  }
  assert.ok(Math.abs(propensities - 1) < 1e-9, `propensities sum to 1, got ${propensities}`);
  assert.equal(typeof resp.policy, "string");
  assert.equal(typeof resp.explored, "boolean");
  assert.equal(typeof resp.featureVersion, "string");
  assert.ok(resp.featureVersion.length > 0, "featureVersion is set");
  const arm = resp.ranking[0].arm;
  return { ...resp, arm, featureMap: featureMap(resp.features) };
}

async function stats(userId) {
  const resp = await call("Stats", { userId });
  assert.equal(resp.userId, userId);
  for (const key of ["decisions", "rewarded", "pending", "users"]) {
    assert.match(resp[key], DECIMAL, `Stats.${key} is a uint64 as a decimal string`);
  }
  assert.equal(typeof resp.rewardSum, "number");
  const arms = {};
  for (const a of resp.arms) {
    assert.match(a.pulls, DECIMAL);
    assert.match(a.rewarded, DECIMAL);
    assert.equal(typeof a.rewardSum, "number");
    assert.equal(typeof a.meanReward, "number");
    assert.equal(typeof a.estimate, "number");
    arms[a.arm] = { pulls: Number(a.pulls), rewarded: Number(a.rewarded), rewardSum: a.rewardSum };
  }
  // A user's answer carries that user's figures only; the process-wide ingest counters
  // (and users, shadows) are the policy-level answer's, asked for without a user.
  assert.deepEqual(resp.ingest, {}, "a per-user Stats carries no server-wide ingest counters");
  assert.equal(resp.users, "0", "users is a policy-level figure");
  const server = await call("Stats", {});
  assert.equal(server.userId, "");
  assert.match(server.users, DECIMAL, "Stats.users");
  const ingest = {};
  for (const [k, v] of Object.entries(server.ingest)) {
    assert.match(v, DECIMAL, `Stats.ingest.${k}`);
    ingest[k] = Number(v);
  }
  return {
    raw: resp,
    decisions: Number(resp.decisions),
    rewarded: Number(resp.rewarded),
    pending: Number(resp.pending),
    rewardSum: resp.rewardSum,
    arms,
    features: featureMap(resp.features),
    ingest,
  };
}

// A failure no amount of waiting can fix (a dead letter): `eventually` stops at once.
class Terminal extends Error {}

// Retries check until it passes or POLL_WITHIN_MS runs out; then throws its last failure
// with what `explain` adds (counters, dead letters).
async function eventually(what, check, explain = async () => "") {
  const deadline = Date.now() + POLL_WITHIN_MS;
  for (;;) {
    try {
      return await check();
    } catch (err) {
      if (err instanceof Terminal) {
        err.message = `${what}: ${err.message}${await explain()}`;
        throw err;
      }
      if (!(err instanceof assert.AssertionError)) throw err;
      if (Date.now() > deadline) {
        err.message = `${what}: not reached within ${POLL_WITHIN_MS} ms: ${err.message}${await explain()}`;
        throw err;
      }
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

// With ingest on, every decision comes back as a TipServed signal and counts in the user's
// tip_volume_30d. Waiting for them leaves nothing in flight, so the next scenario's deltas
// of the process-wide Stats.ingest counters are exact.
async function servedSignalsLanded(user, decisions, counters0) {
  await eventually(
    `the ${decisions} TipServed signals of ${user} were ingested`,
    async () => {
      const s = await stats(user);
      noDeadLetters(s, counters0);
      assert.deepEqual(s.features.tip_volume_30d, {
        value: decisions,
        origin: "FEATURE_ORIGIN_PROFILE_STORE",
      });
    },
    () => explainIngest(user),
  );
}

const CANDIDATES = [
  { tipId: "tip-focus", arm: "focus" },
  { tipId: "tip-break", arm: "break" },
];

// --- scenario: grpc ----------------------------------------------------------------------

async function grpcScenario() {
  const user = `rec-grpc-${RUN}`;
  const counters0 = (await stats(user)).ingest;
  const first = await score(user, CANDIDATES, {
    context: { hourOfDay: 9, timezone: "Europe/Paris", openTasks: 4 },
    // proto-loader (keepCase: false) names this field completionRate_30d: protobufjs
    // camel-cases only "_<letter>", so the proto3 JSON name completionRate30d would be
    // silently dropped. Checked below, so a recommender writing the JSON name is warned.
    profileFeatures: { completionRate_30d: 0.25 },
  });
  assert.equal(first.policy, "egreedy", "the default policy answers");
  assert.deepEqual(first.featureMap.hour_of_day, { value: 9, origin: "FEATURE_ORIGIN_REQUEST" });
  assert.deepEqual(first.featureMap.open_tasks, { value: 4, origin: "FEATURE_ORIGIN_REQUEST" });
  assert.deepEqual(first.featureMap.completion_rate_30d, {
    value: 0.25,
    origin: "FEATURE_ORIGIN_REQUEST",
  });
  const dropped = await score(user, CANDIDATES, { profileFeatures: { completionRate30d: 0.25 } });
  assert.equal(
    dropped.featureMap.completion_rate_30d.origin,
    "FEATURE_ORIGIN_FALLBACK",
    "grpc-js drops the proto3 JSON name completionRate30d (use completionRate_30d)",
  );
  // Nothing known about this user: the contract's fallback (proto: fallback 8000).
  assert.deepEqual(first.featureMap.mean_dwell_ms_30d, {
    value: 8000,
    origin: "FEATURE_ORIGIN_FALLBACK",
  });

  const reward = await call("Reward", { decisionId: first.decisionId, reward: 1 });
  assert.deepEqual(reward, { applied: true, policy: "egreedy", arm: first.arm });
  const again = await call("Reward", { decisionId: first.decisionId, reward: 1 });
  assert.deepEqual(again, { applied: false, policy: "egreedy", arm: first.arm });

  const second = await score(user, CANDIDATES);
  const s = await stats(user);
  assert.equal(s.raw.policy, "egreedy");
  assert.equal(s.raw.featureVersion, first.featureVersion);
  assert.equal(s.decisions, 3);
  assert.equal(s.rewarded, 1);
  assert.equal(s.pending, 2);
  assert.equal(s.rewardSum, 1);
  assert.equal(s.arms[first.arm].rewarded, 1, `arm ${first.arm} rewarded once`);
  assert.equal(s.arms[first.arm].rewardSum, 1, `arm ${first.arm} reward_sum`);
  const pulls = Object.values(s.arms).reduce((n, a) => n + a.pulls, 0);
  assert.equal(pulls, 3, "three decisions, three pulls");
  assert.ok(s.arms[second.arm].pulls >= 1);
  assert.ok("mean_dwell_ms_30d" in s.features, "Stats lists the profile features");

  const gen = await call("Generate", { userId: user, context: { hourOfDay: 9 } });
  assert.equal(typeof gen.text, "string");
  assert.ok(gen.text.length > 0, "Generate.text is set");
  assert.equal(typeof gen.promptVersion, "string");
  assert.ok(gen.promptVersion.length > 0, "Generate.promptVersion is set");
  assert.equal(gen.fallback, true, "no model is configured: a curated fallback");
  assert.equal(gen.fallbackReason, "no model configured");
  assert.equal(typeof gen.generationId, "string");
  assert.ok(gen.generationId.length > 0, "Generate.generationId is set");
  assert.equal(typeof gen.latencyMs, "number");

  const bad = await callFails("Score", {
    userId: user,
    candidates: [{ tipId: "", arm: "focus" }],
  });
  assert.equal(bad.code, grpc.status.INVALID_ARGUMENT, `Score with an empty tip id: ${bad.message}`);
  const violations = fieldViolations(bad);
  assert.ok(
    "candidates[0].tip_id" in violations,
    `a BadRequest violation names candidates[0].tip_id, got ${JSON.stringify(violations)}`,
  );

  const missing = await callFails("Reward", { decisionId: `no-such-decision-${RUN}`, reward: 1 });
  assert.equal(missing.code, grpc.status.NOT_FOUND, `Reward of an unknown decision: ${missing.message}`);

  if (Object.keys(s.ingest).length > 0) await servedSignalsLanded(user, 3, counters0);

  return {
    decisionId: first.decisionId,
    arm: first.arm,
    promptVersion: gen.promptVersion,
    violations,
  };
}

// --- scenarios: events-binary, events-json -----------------------------------------------

function rfc3339(ms) {
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
}

// An event as the producers describe it (proto3 JSON field names and values). The JSON
// encoding sends exactly this; the binary one converts it with protobufjs.
function envelope(eventId, userId, occurredAtMs, payload) {
  return {
    eventId,
    schemaVersion: "v1",
    producer: "recommender-interop",
    occurredAt: rfc3339(occurredAtMs),
    userId,
    ...payload,
  };
}

function timestampToObject(text) {
  const ms = Date.parse(text);
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

function makeEncoder(encoding) {
  if (encoding === "json") {
    return (event) => ({
      data: new TextEncoder().encode(JSON.stringify(event)),
      contentType: "application/json",
    });
  }
  const Envelope = loadRoot("oo/events/v1/envelope.proto").lookupType("oo.events.v1.Envelope");
  return (event) => {
    const obj = structuredClone(event);
    obj.occurredAt = timestampToObject(obj.occurredAt);
    for (const t of obj.taskSynced?.tasks ?? []) {
      if (t.dueTime) t.dueTime = timestampToObject(t.dueTime);
    }
    const message = Envelope.fromObject(obj);
    const problem = Envelope.verify(message);
    assert.equal(problem, null, `protobufjs rejects the envelope: ${problem}`);
    // Round trip: what we send decodes to what we meant.
    const data = Envelope.encode(message).finish();
    const back = Envelope.toObject(Envelope.decode(data), { enums: String, longs: Number });
    assert.equal(back.schemaVersion, "v1");
    assert.equal(back.eventId, event.eventId);
    return { data, contentType: null };
  };
}

// The reasons of the dead letters in oo-ml's DLQ stream (for failure messages).
async function deadLetterReasons() {
  if (!opts.nats) return ["(no --nats URL: dead letters not read)"];
  let nc;
  try {
    nc = await connect({ servers: opts.nats, name: "recommender-interop-dlq" });
    const jsm = await jetstreamManager(nc);
    const name = await jsm.streams.find("dlq.>");
    const n = Math.min((await jsm.streams.info(name)).state.messages, 50);
    const out = [];
    if (n === 0) return out;
    const consumer = await jetstream(nc).consumers.get(name); // ordered, ephemeral
    for await (const m of await consumer.fetch({ max_messages: n, expires: 2000 })) {
      out.push(`${m.subject}: ${m.headers?.get("Oo-Dlq-Reason")}`);
      if (out.length >= n) break;
    }
    return out;
  } catch (err) {
    return [`(could not read the dead letters: ${err.message})`];
  } finally {
    await nc?.close();
  }
}

// What a failed ingest check prints: the user's Stats, the counters, the dead letters.
async function explainIngest(user) {
  const s = await stats(user).catch((e) => ({ error: e.message }));
  const dead = await deadLetterReasons();
  return (
    `\n  Stats(${user}): ${JSON.stringify({ rewarded: s.rewarded, arms: s.arms, features: s.features, error: s.error })}` +
    `\n  ingest counters: ${JSON.stringify(s.ingest)}` +
    `\n  dead letters (${dead.length}):${dead.map((d) => `\n    ${d}`).join("")}`
  );
}

// Dead letters are final: fail at once rather than wait for the poll deadline.
function noDeadLetters(s, counters0) {
  const dead = s.ingest.dead_lettered - counters0.dead_lettered;
  if (dead > 0) throw new Terminal(`${dead} message(s) dead-lettered`);
}

async function eventsScenario(encoding) {
  const user = `rec-events-${encoding}-${RUN}`;
  const encode = makeEncoder(encoding);
  const nc = await connect({ servers: opts.nats, name: `recommender-interop-${encoding}` });
  try {
    const js = jetstream(nc);
    const jsm = await jetstreamManager(nc);
    // oo-ml creates its streams when its ingest starts: wait for them as a producer would.
    await eventually("oo-ml's streams exist", async () => {
      for (const subject of ["feedback.tip", "signals.tip.viewed", "signals.task.synced"]) {
        try {
          await jsm.streams.find(subject);
        } catch (err) {
          assert.fail(`no stream captures ${subject}: ${err.message}`);
        }
      }
    });
    const explain = () => explainIngest(user);

    const publish = async (subject, event, msgID) => {
      const { data, contentType } = encode(event);
      const h = natsHeaders();
      if (contentType) h.set("Content-Type", contentType);
      const options = { headers: h };
      if (msgID) options.msgID = msgID;
      const ack = await js.publish(subject, data, options);
      assert.equal(typeof ack.seq, "number");
      return ack;
    };

    const before = await stats(user);
    assert.equal(before.decisions, 0, "a fresh user");
    const counters0 = before.ingest;
    assert.ok("duplicates" in counters0, "Stats.ingest has the counters: ingest is on");

    // Two decisions: the user completes the first tip and dismisses the second.
    const d1 = await score(user, CANDIDATES);
    const d2 = await score(user, CANDIDATES);
    assert.equal(d1.featureMap.completion_rate_30d.origin, "FEATURE_ORIGIN_FALLBACK");
    assert.equal(d1.featureMap.open_tasks.origin, "FEATURE_ORIGIN_FALLBACK");

    const now = Date.now();
    const at = now - 60_000;
    const completed = envelope(`fb-1-${user}`, user, at, {
      tipFeedback: {
        decisionId: d1.decisionId,
        tipId: d1.chosenTipId,
        action: "TIP_ACTION_COMPLETED",
        dwellMs: 5000,
      },
    });
    const dismissed = envelope(`fb-2-${user}`, user, at, {
      tipFeedback: { decisionId: d2.decisionId, tipId: d2.chosenTipId, action: "TIP_ACTION_DISMISSED" },
    });
    const views = [1200, 3400].map((dwellMs, i) =>
      envelope(`view-${i}-${user}`, user, at, {
        tipViewed: { decisionId: d1.decisionId, tipId: d1.chosenTipId, dwellMs },
      }),
    );
    const tasks = envelope(`tasks-1-${user}`, user, at, {
      taskSynced: {
        provider: "todoist",
        tasks: [
          { id: "a", title: "Pay rent", dueTime: rfc3339(now - 3_600_000), priority: 4 },
          { id: "b", title: "File taxes", dueTime: rfc3339(now - 86_400_000) },
          { id: "c", title: "Plan sprint", dueTime: rfc3339(now + 86_400_000) },
          { id: "d", title: "Read a book" },
          { id: "e", title: "Done already", dueTime: rfc3339(now - 3_600_000), completed: true },
        ],
      },
    });
    const expectOpen = 4;
    const expectOverdue = 2;

    await publish("feedback.tip", completed, completed.eventId);
    // The same event again: JetStream drops it by Nats-Msg-Id ...
    const dupAck = await publish("feedback.tip", completed, completed.eventId);
    assert.equal(dupAck.duplicate, true, "JetStream saw the same Nats-Msg-Id");
    await publish("feedback.tip", dismissed, dismissed.eventId);
    for (const v of views) await publish("signals.tip.viewed", v, v.eventId);
    await publish("signals.task.synced", tasks, tasks.eventId);
    // ... and once more without a Nats-Msg-Id (a producer retry after the stream's
    // duplicate window): oo-ml itself must apply the event_id once.
    await publish("feedback.tip", completed, null);

    const expectArms = {};
    for (const [d, r] of [
      [d1, 1],
      [d2, 0],
    ]) {
      const a = (expectArms[d.arm] ??= { rewarded: 0, rewardSum: 0 });
      a.rewarded += 1;
      a.rewardSum += r;
    }
    const settled = await eventually(
      "every event took effect",
      async () => {
        const s = await stats(user);
        noDeadLetters(s, counters0);
        assert.equal(s.ingest.duplicates - counters0.duplicates, 1, "one duplicate event_id seen");
        assert.equal(s.rewarded, 2, "rewarded decisions");
        assert.equal(s.rewardSum, 1, "reward_sum");
        for (const [arm, e] of Object.entries(expectArms)) {
          assert.equal(s.arms[arm]?.rewarded, e.rewarded, `arm ${arm} rewarded`);
          assert.equal(s.arms[arm]?.rewardSum, e.rewardSum, `arm ${arm} reward_sum`);
        }
        const f = s.features;
        assert.deepEqual(f.completion_rate_30d, { value: 0.5, origin: "FEATURE_ORIGIN_PROFILE_STORE" });
        assert.deepEqual(f.dismiss_rate_30d, { value: 0.5, origin: "FEATURE_ORIGIN_PROFILE_STORE" });
        assert.deepEqual(f.mean_dwell_ms_30d, { value: 2300, origin: "FEATURE_ORIGIN_PROFILE_STORE" });
        assert.deepEqual(f.open_tasks, { value: expectOpen, origin: "FEATURE_ORIGIN_TASK_STORE" });
        assert.deepEqual(f.overdue_tasks, { value: expectOverdue, origin: "FEATURE_ORIGIN_TASK_STORE" });
        // The completed feedback's UTC hour (no event carries the user's time zone yet).
        assert.deepEqual(f.preferred_hour, {
          value: new Date(at).getUTCHours(),
          origin: "FEATURE_ORIGIN_PROFILE_STORE",
        });
        // oo-ml's own TipServed signals for the two decisions came back through signals.>.
        assert.deepEqual(f.tip_volume_30d, { value: 2, origin: "FEATURE_ORIGIN_PROFILE_STORE" });
        return s;
      },
      explain,
    );
    // Exact process-wide deltas (the scenarios run one at a time against one server): our
    // 5 distinct events and the 2 TipServed signals oo-ml published for d1 and d2.
    const delta = (k) => settled.ingest[k] - (counters0[k] ?? 0);
    const why = await explain();
    assert.equal(delta("dead_lettered"), 0, `no dead letters${why}`);
    assert.equal(delta("applied"), 7, `applied: 5 events + 2 serve signals${why}`);
    assert.equal(delta("rewards_applied"), 2, `rewards from feedback${why}`);
    assert.equal(delta("unknown_kind"), 0, `unknown kinds${why}`);

    // The feedback rewarded d1: the recommender's own Reward now changes nothing.
    const reward = await call("Reward", { decisionId: d1.decisionId, reward: 1 });
    assert.deepEqual(reward, { applied: false, policy: "egreedy", arm: d1.arm });
    // Score sees what Stats sees.
    const d3 = await score(user, CANDIDATES);
    assert.deepEqual(d3.featureMap.open_tasks, settled.features.open_tasks);
    assert.deepEqual(d3.featureMap.mean_dwell_ms_30d, settled.features.mean_dwell_ms_30d);
    await servedSignalsLanded(user, 3, counters0);

    return {
      user,
      encoding,
      arms: settled.arms,
      features: Object.fromEntries(
        Object.entries(settled.features).filter(([, v]) => v.origin !== "FEATURE_ORIGIN_FALLBACK"),
      ),
      ingestDelta: Object.fromEntries(
        Object.entries(settled.ingest).map(([k, v]) => [k, v - (counters0[k] ?? 0)]),
      ),
    };
  } finally {
    await nc.close();
  }
}

// --- main --------------------------------------------------------------------------------

const started = performance.now();
try {
  const result =
    scenario === "grpc"
      ? await grpcScenario()
      : await eventsScenario(scenario === "events-json" ? "json" : "binary");
  const ms = Math.round(performance.now() - started);
  console.log(JSON.stringify({ scenario, ok: true, ms, ...result }));
  client.close();
  process.exit(0);
} catch (err) {
  console.error(`interop scenario ${scenario} FAILED: ${err.message}`);
  const frames = (err.stack ?? "").split("\n").filter((l) => /^\s+at /.test(l));
  if (frames.length) console.error(frames.slice(0, 4).join("\n"));
  client.close();
  process.exit(1);
}
