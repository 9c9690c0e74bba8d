// Refinery from TypeScript, starting from an image: upload a PNG through UploadImage (a client-streaming call:
// a header with the file's size and sha256, then its bytes in 64 KiB messages), then run img2img over it with a
// refiner, keep the result on the server, and save it.
//
//   npm ci && npm run build && node dist/img2img.js [HOST:PORT] [OUT.png] [IN.png]
//
// IN.png: a PNG, JPEG or WebP whose sides are multiples of 8 (e.g. a result of dist/generate.js).
import { createHash } from "node:crypto";
import { createReadStream, writeFileSync } from "node:fs";
import { create } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  GenerateRequestSchema,
  GenerationService,
  ImageInputSchema,
  ImageMode,
  type UploadImageRequest,
  UploadImageRequestSchema,
} from "./gen/refinery/v1/generation_pb.js";
import { ImageAssembler } from "./image_assembler.js";
import { headers } from "./metadata.js";

const [target = "localhost:50051", out = "img2img.png", input = "lighthouse.png"] = process.argv.slice(2);
const CHUNK_BYTES = 64 * 1024; // the server refuses a message over 128 KiB

const transport = createGrpcTransport({ baseUrl: `http://${target}`, readMaxBytes: 4 << 20 });
const client = createClient(GenerationService, transport);

// The header first: the size lets the server refuse a file over its limits or quota before storing a byte, and
// the sha256 lets it tell a broken stream from the file. The file is read twice rather than held in memory.
async function* uploadMessages(path: string): AsyncGenerator<UploadImageRequest> {
  const hash = createHash("sha256");
  let size = 0n;
  for await (const chunk of createReadStream(path)) {
    hash.update(chunk as Buffer);
    size += BigInt((chunk as Buffer).length);
  }
  const header = { sizeBytes: size, sha256: hash.digest("hex"), keepFor: { seconds: 600n } };
  yield create(UploadImageRequestSchema, { part: { case: "header", value: header } });
  for await (const chunk of createReadStream(path, { highWaterMark: CHUNK_BYTES })) {
    yield create(UploadImageRequestSchema, { part: { case: "data", value: chunk as Buffer } });
  }
}

const request = create(GenerateRequestSchema, {
  requestId: "example-typescript-img2img",
  positivePrompt: "a lighthouse on a cliff at dawn, oil painting",
  steps: 20,
  seed: 7n,
  strength: 0.5, // the last floor(20 x 0.5) = 10 steps of the 20-step grid run: steps 11..20
  refiner: { start: { case: "startStepPercentage", value: 90 } }, // the base runs 11..18, the refiner 19..20
  keepResults: { seconds: 600n }, // keep the result 10 minutes, named by Image.reference
});

// Upload with the pair of the request that will use the image, so a balancer routing by pair puts both together.
const stored = await client.uploadImage(uploadMessages(input), { headers: headers(request), timeoutMs: 60_000 });
const expires = stored.expires ? new Date(Number(stored.expires.seconds) * 1000).toISOString() : "?";
console.log(`uploaded ${input} as ${stored.reference} (${stored.width}x${stored.height}, kept until ${expires})`);

// A small image (at most 96 KiB) may instead go inline: image: { source: { case: "data", value: bytes } }.
request.image = create(ImageInputSchema, { source: { case: "reference", value: stored.reference } });
const images = new ImageAssembler();
for await (const response of client.generate(request, { headers: headers(request), timeoutMs: 600_000 })) {
  const event = response.event;
  if (event.case === "progress") {
    const p = event.value; // stage steps and total_steps count the steps that run, not the grid
    console.log(`step ${p.overallStep}/${p.totalSteps}`);
  }
  const image = images.feed(response);
  if (image) {
    writeFileSync(out, image.data);
    console.log(`wrote ${out} (${image.width}x${image.height}, seed ${image.seed})`);
    const mode = ImageMode[image.mode].toLowerCase(); // IMG2IMG, INPAINT; UNSPECIFIED: text-to-image
    console.log(`${mode} from step ${image.firstStep}: ${image.baseSteps} base + ${image.refinerSteps} refiner steps`);
    console.log(`kept as ${image.reference}`);
  }
}
images.finish();
