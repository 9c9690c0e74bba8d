// The chunk helper on hand-built streams: `node --test dist/` after `npm run build`.
import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import {
  GenerateResponseSchema,
  ImageSchema,
  type GenerateResponse,
} from "./gen/refinery/v1/generation_pb.js";
import { ImageAssembler } from "./image_assembler.js";

const data = Uint8Array.from({ length: 10_000 }, (_, i) => (i * 7) % 251);

function chunks(index: number, piece: number): GenerateResponse[] {
  const out: GenerateResponse[] = [];
  for (let offset = 0; offset < data.length; offset += piece) {
    const last = offset + piece >= data.length;
    const value = {
      index,
      offset: BigInt(offset),
      totalSize: BigInt(data.length),
      data: data.subarray(offset, offset + piece),
      image: last ? create(ImageSchema, { index, width: 2048, height: 2048, seed: 7n }) : undefined,
    };
    out.push(create(GenerateResponseSchema, { event: { case: "imageChunk", value } }));
  }
  return out;
}

function run(responses: GenerateResponse[]) {
  const assembler = new ImageAssembler();
  const images = responses.map((r) => assembler.feed(r)).filter((i) => i !== undefined);
  assembler.finish();
  return images;
}

const progress = create(GenerateResponseSchema, { event: { case: "progress", value: { step: 1 } } });

test("chunks come back as one image, beside whole ones", () => {
  const whole = create(GenerateResponseSchema, { event: { case: "image", value: { index: 1, data: data } } });
  const images = run([progress, ...chunks(0, 3000), whole, ...chunks(2, 4096)]);
  assert.deepEqual(
    images.map((i) => [i.index, i.seed, Buffer.from(i.data).equals(data)]),
    [[0, 7n, true], [1, 0n, true], [2, 7n, true]],
  );
});

test("a stream that ends inside a run of chunks is an error", () => {
  assert.throws(() => run(chunks(0, 3000).slice(0, -1)), /ended before its last chunk/);
});

test("another event inside a run is an error", () => {
  const run0 = chunks(0, 3000);
  assert.throws(() => run([run0[0], progress, ...run0.slice(1)]), /progress event arrived/);
});

test("chunks of two images mixed are an error", () => {
  const [a, b] = [chunks(0, 3000), chunks(1, 3000)];
  assert.throws(() => run([a[0], b[0], ...a.slice(1), ...b.slice(1)]), /a chunk of image 1/);
});

test("a missing chunk is an error", () => {
  const run0 = chunks(0, 3000);
  assert.throws(() => run([run0[0], ...run0.slice(2)]), /chunks are missing/);
});
