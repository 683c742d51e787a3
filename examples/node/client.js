#!/usr/bin/env node
// A Node client of diffmesh.v1.Orchestrator: @grpc/grpc-js with the contract loaded from protos/
// at run time by @grpc/proto-loader (no generated code). It calls Generate and GenerateStream
// (with progress), shows a deadline and a rejected request with its structured error details,
// and prints one JSON object with what it saw.
//
//   npm ci && node client.js --address 127.0.0.1:50051 --model tiny-sd15 [--out DIR]
//       [--stream-size 1152] [--max-receive-mb 4] [--timeout-ms 120000]
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const googleProtoFiles = require('google-proto-files');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const DETAILS_KEY = 'grpc-status-details-bin';

function loadOrchestrator() {
  const definition = protoLoader.loadSync('diffmesh/v1/orchestrator.proto', {
    includeDirs: [PROTOS],
    keepCase: true, // field names exactly as in the .proto (snake_case)
    longs: String, // int64 seeds stay exact (a JS number holds only 53 bits)
    enums: String,
    defaults: true, // unset fields read as their zero value, as in every other language
    oneofs: true, // GenerateEvent.event names the case that is set
  });
  return grpc.loadPackageDefinition(definition).diffmesh.v1.Orchestrator;
}

// google.rpc.Status and its detail messages, from the googleapis protos that google-proto-files
// ships; protobufjs (proto-loader's own parser) decodes them.
const rpcTypes = protobuf.loadSync([
  googleProtoFiles.getProtoPath('rpc', 'status.proto'),
  googleProtoFiles.getProtoPath('rpc', 'error_details.proto'),
]);
const Status = rpcTypes.lookupType('google.rpc.Status');

// The structured details of a failed call: the google.rpc.Status the server put in the
// grpc-status-details-bin trailer, each Any unpacked by its type URL.
function errorDetails(error) {
  const [raw] = error.metadata ? error.metadata.get(DETAILS_KEY) : [];
  const found = { violations: [], error_info: [] };
  if (!raw) return found;
  const status = Status.decode(raw);
  for (const detail of status.details) {
    const typeName = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
    const type = rpcTypes.lookupTypeOrEnum(typeName);
    const message = type.toObject(type.decode(detail.value));
    if (typeName === 'google.rpc.BadRequest') {
      for (const v of message.fieldViolations || []) {
        found.violations.push({ field: v.field, description: v.description, reason: v.reason || '' });
      }
    } else if (typeName === 'google.rpc.ErrorInfo') {
      found.error_info.push({ domain: message.domain, reason: message.reason, metadata: message.metadata || {} });
    }
  }
  return found;
}

function codeName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function deadlineIn(ms) {
  return new Date(Date.now() + ms);
}

function describeImages(images, outDir, stem) {
  return images.map((generated) => {
    const { image } = generated;
    if (outDir) {
      const extension = image.mime_type.split('/')[1];
      fs.writeFileSync(path.join(outDir, `${stem}-${generated.index}.${extension}`), image.data);
    }
    return {
      index: generated.index, seed: generated.seed, mime_type: image.mime_type,
      width: image.width, height: image.height, bytes: image.data.length,
    };
  });
}

function generate(client, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client.Generate(request, { deadline: deadlineIn(timeoutMs) }, (error, response) => (
      error ? reject(error) : resolve(response)));
  });
}

// GenerateStream: progress events, then each image as `image` chunk events (consecutive, in
// order; the one with last = true completes the file), then one `result` with the info.
function generateStream(client, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    const progress = [];
    const images = [];
    let pieces = [];
    let received = 0;
    let chunks = 0;
    let result = null;
    const call = client.GenerateStream(request, { deadline: deadlineIn(timeoutMs) });
    call.on('data', (event) => {
      if (event.event === 'progress') {
        const p = event.progress;
        progress.push({ step: p.step, total_steps: p.total_steps, phase: p.phase });
        process.stderr.write(`\r${p.phase || 'base'} step ${p.step}/${p.total_steps}`);
      } else if (event.event === 'image') {
        const chunk = event.image;
        chunks += 1;
        if (Number(chunk.offset) !== received) {
          call.cancel();
          reject(new Error(`image ${chunk.index}: chunk ${chunk.chunk} at offset ${chunk.offset}, expected ${received}`));
          return;
        }
        pieces.push(chunk.data);
        received += chunk.data.length;
        if (chunk.last) {
          const data = Buffer.concat(pieces);
          if (data.length !== Number(chunk.file_size)) {
            call.cancel();
            reject(new Error(`image ${chunk.index}: ${data.length} bytes, file_size says ${chunk.file_size}`));
            return;
          }
          images.push({
            index: chunk.index, seed: chunk.seed,
            image: { data, mime_type: chunk.mime_type, width: chunk.width, height: chunk.height },
          });
          pieces = [];
          received = 0;
        }
      } else if (event.event === 'result') {
        result = event.result;
      }
    });
    call.on('error', reject);
    call.on('end', () => {
      process.stderr.write('\n');
      // A server from before image events sent the images inside the result.
      resolve({ progress, chunks, result, images: images.length ? images : (result ? result.images : []) });
    });
  });
}

// A call expected to fail: its status code, message and structured details.
async function failure(promise) {
  try {
    await promise;
  } catch (error) {
    if (error.code === undefined) throw error;
    return { code: codeName(error.code), message: error.details, ...errorDetails(error) };
  }
  throw new Error('the call was expected to fail but succeeded');
}

async function main() {
  const { values } = parseArgs({
    options: {
      address: { type: 'string', default: '127.0.0.1:50051' },
      model: { type: 'string', default: '' },
      out: { type: 'string' },
      'timeout-ms': { type: 'string', default: '120000' },
      'max-receive-mb': { type: 'string', default: '4' },
      'stream-size': { type: 'string', default: '64' }, // width and height of the streamed image
    },
  });
  const timeoutMs = Number(values['timeout-ms']);
  if (values.out) fs.mkdirSync(values.out, { recursive: true });

  const Orchestrator = loadOrchestrator();
  const client = new Orchestrator(values.address, grpc.credentials.createInsecure(), {
    // The largest reply this client accepts. The orchestrator keeps every message within its
    // max_unary_reply_mb (default 4 MiB, what stock clients accept): GenerateStream sends images in
    // chunks of at most 3 MiB, and a unary Generate whose reply could be larger fails up front
    // with FAILED_PRECONDITION. Keep this equal to the deployment's max_unary_reply_mb; a client
    // limit below the server's makes the client drop replies as RESOURCE_EXHAUSTED, which the
    // contract otherwise uses for "at capacity, retry".
    'grpc.max_receive_message_length': Number(values['max-receive-mb']) * 1024 * 1024,
  });

  const base = { model: values.model, width: 64, height: 64, scheduler: 'euler' };

  // Unary: two images, image i uses seed + i.
  const unary = await generate(client, { ...base, prompt: 'a lighthouse at dusk', steps: 2, seed: 7, count: 2 },
    timeoutMs);

  // Streaming: a progress event per denoising step, then the result.
  const side = Number(values['stream-size']);
  const streamed = await generateStream(client, {
    ...base, prompt: 'a lighthouse', steps: 3, seed: 11, width: side, height: side,
  }, timeoutMs);
  if (!streamed.result) throw new Error('GenerateStream ended without a result');

  // A rejected request: INVALID_ARGUMENT with a google.rpc.BadRequest naming the field.
  const badRequest = await failure(generate(client, { ...base, prompt: 'a lighthouse', steps: 2, width: 100 },
    timeoutMs));

  // A deadline shorter than the work: DEADLINE_EXCEEDED (the mesh stops the denoiser too).
  const deadline = await failure(generate(client, {
    ...base, prompt: 'a long job', width: 256, height: 256, steps: 150, seed: 1,
  }, 300));

  client.close();
  console.log(JSON.stringify({
    generate: {
      images: describeImages(unary.images, values.out, 'generate'),
      model: unary.info.model, steps: unary.info.steps, request_id: unary.info.request_id,
      stages: unary.info.timings.map((t) => t.stage),
    },
    stream: {
      progress: streamed.progress,
      chunks: streamed.chunks,
      images: describeImages(streamed.images, values.out, 'stream'),
      model: streamed.result.info.model, steps: streamed.result.info.steps,
    },
    bad_request: badRequest,
    deadline,
  }, null, 2));
}

main().catch((error) => {
  console.error(`diffmesh example failed: ${error.code !== undefined ? `${codeName(error.code)}: ${error.details}` : error.stack}`);
  process.exit(1);
});
