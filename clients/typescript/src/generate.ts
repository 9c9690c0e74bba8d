// Refinery from TypeScript: stream a refined generation (a LoRA on each stage, a compel-weighted prompt) with its
// progress, save the image and say what the server applied, then show how a bad request is refused
// (google.rpc.BadRequest names the field).
//
//   npm ci && npm run build && node dist/generate.js [HOST:PORT] [OUT.png]
import { writeFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { BadRequestSchema } from "./gen/google/rpc/error_details_pb.js";
import {
  GenerateRequestSchema,
  GenerationService,
  PromptWeighting,
  Stage,
  type Image,
  type Lora,
} from "./gen/refinery/v1/generation_pb.js";
import { ImageAssembler } from "./image_assembler.js";
import { headers } from "./metadata.js";

const [target = "localhost:50051", out = "lighthouse.png"] = process.argv.slice(2);

const transport = createGrpcTransport({
  baseUrl: `http://${target}`, // https:// for TLS
  // Connect-ES accepts messages up to 4 GiB unless told otherwise. Refinery never sends one over 3 MiB
  // (large images come in chunks), so the 4 MiB every other gRPC library defaults to is plenty.
  readMaxBytes: 4 << 20,
});
const client = createClient(GenerationService, transport);

async function generate(): Promise<void> {
  const request = create(GenerateRequestSchema, {
    requestId: "example-typescript-1", // echoed on every response and in the server's log; empty: one is assigned
    positivePrompt: "a lighthouse on a cliff at (dusk)1.2, (fog)0.8", // compel syntax: a weight after ( )
    promptWeighting: PromptWeighting.COMPEL, // unset: plain text, every character part of the prompt
    steps: 20,
    seed: 7n, // uint64: a bigint in Connect-ES
    loras: [{ model: "builtin:tiny-lora-base@1", weight: 0.8 }], // the base's alone; weight unset: 1
    refiner: {
      start: { case: "startStepPercentage", value: 90 }, // no model: the server's default refiner
      loras: [{ model: "builtin:tiny-lora-refiner@1" }], // a LoRA trained on the refiner's own UNet
    },
  });
  const images = new ImageAssembler();
  for await (const response of client.generate(request, { headers: headers(request), timeoutMs: 600_000 })) {
    const event = response.event;
    if (event.case === "queued") {
      console.log(`queued: position ${event.value.position} of ${event.value.queueDepth}`);
    } else if (event.case === "progress") {
      const p = event.value;
      console.log(`${Stage[p.stage]} ${p.step}/${p.stageSteps} (step ${p.overallStep}/${p.totalSteps})`);
    }
    const image = images.feed(response); // a whole image: from an `image` event or its last chunk
    if (image) {
      writeFileSync(out, image.data);
      console.log(`wrote ${out} (${image.width}x${image.height}, seed ${image.seed}, request ${response.requestId})`);
      console.log(`${image.baseSteps} base + ${image.refinerSteps} refiner steps`);
      report(image);
    }
  }
  images.finish();
}

// What the server applied and read: the LoRAs of each stage as canonical AIRs with the weights used, and per
// text encoder the tokens of the prompt and the negative prompt, in 75-token windows.
function report(image: Image): void {
  // A weight is a float32 on the wire: 0.8 comes back as 0.800000011920929 unless rounded.
  const listed = (loras: Lora[]) =>
    loras.map((lora) => `${lora.model} (weight ${Number((lora.weight ?? 1).toPrecision(6))})`).join(", ") || "none";
  console.log(`loras: base ${listed(image.loras)}; refiner ${listed(image.refinerLoras)}`);
  for (const read of image.promptTokens) {
    const tokens = `${read.positiveTokens} + ${read.negativeTokens} tokens`;
    console.log(`${Stage[read.stage]} ${read.textEncoder}: ${tokens} in ${read.chunks} window(s)`);
  }
}

async function badRequest(): Promise<void> {
  // The refiner cannot take over at step 30 of 20.
  const request = create(GenerateRequestSchema, {
    positivePrompt: "a cat",
    steps: 20,
    refiner: { start: { case: "startStep", value: 30 } },
  });
  try {
    for await (const _ of client.generate(request, { headers: headers(request) })) {
      // nothing arrives: a bad request is refused before any work
    }
  } catch (err) {
    const error = ConnectError.from(err);
    console.log(`refused: ${Code[error.code]}: ${error.rawMessage}`);
    for (const bad of error.findDetails(BadRequestSchema)) {
      for (const violation of bad.fieldViolations) {
        console.log(`  ${violation.field}: ${violation.description}`);
      }
    }
    return;
  }
  throw new Error("the server accepted a bad request");
}

await generate();
await badRequest();
