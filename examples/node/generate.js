// Stream a generation from a Shard coordinator over mutual TLS, from the .proto files alone.
//
//   npm install --prefix examples/node          # @grpc/grpc-js and @grpc/proto-loader
//   node examples/node/generate.js --coordinator localhost:50051 --certs certs \
//       --prompt "Once upon a time" --max-tokens 32
//
// The text goes to stderr as it streams; the final GenerationSummary to stdout as JSON.
// --certs holds ca.pem and the client's <id>.pem/<id>.key (`shard certs local` writes
// client.pem and client.key); --prompt-ids 1,415,1022 sends token ids instead of text.
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const { values: args } = parseArgs({
  options: {
    coordinator: { type: "string", default: "localhost:50051" },
    certs: { type: "string" },
    id: { type: "string", default: "client" },
    prompt: { type: "string", default: "Once upon a time" },
    "prompt-ids": { type: "string" },
    "max-tokens": { type: "string", default: "32" },
    protos: { type: "string", default: path.join(__dirname, "..", "..", "protos") },
  },
});

// keepCase: the fields keep the .proto's names (max_tokens, prompt_ids); longs as numbers.
const definition = protoLoader.loadSync("shard/v1/api.proto", {
  includeDirs: [args.protos], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
});
const { InferenceService } = grpc.loadPackageDefinition(definition).shard.v1;

const read = (name) => fs.readFileSync(path.join(args.certs, name));
const credentials = args.certs
  ? grpc.credentials.createSsl(read("ca.pem"), read(`${args.id}.key`), read(`${args.id}.pem`))
  : grpc.credentials.createInsecure();
const client = new InferenceService(args.coordinator, credentials);

const request = { max_tokens: Number(args["max-tokens"]) };
if (args["prompt-ids"]) request.prompt_ids = { ids: args["prompt-ids"].split(",").map(Number) };
else request.prompt = args.prompt;

const call = client.Generate(request);
call.on("data", (response) => {
  if (response.event === "delta") process.stderr.write(response.delta.text);
  else console.log(JSON.stringify(response.summary));
});
call.on("error", (error) => {
  console.error(`${grpc.status[error.code]}: ${error.details}`);
  process.exitCode = 1;
});
call.on("end", () => client.close());
