// Results larger than 3 MiB arrive as a run of `imageChunk` events instead of one `image` (the rules are in
// generation.proto, ImageChunk). This puts them back together, and refuses a broken run: bytes that broke
// off are not an image and are never returned as one.
import type { GenerateResponse, Image } from "./gen/refinery/v1/generation_pb.js";

export class ImageAssembler {
  private parts: Uint8Array[] = [];
  private received = 0n; // offsets and sizes are uint64: bigint in Connect-ES
  private total = 0n;
  private index = -1; // the result being assembled; -1: none

  /** The whole image this response completes (an `image`, or the last chunk of a run), else undefined. */
  feed(response: GenerateResponse): Image | undefined {
    const event = response.event;
    if (event.case !== "imageChunk") {
      if (this.index >= 0) this.broken(`a ${event.case} event arrived before its last chunk`);
      return event.case === "image" ? event.value : undefined;
    }
    const chunk = event.value;
    if (this.index < 0) {
      [this.index, this.total, this.received, this.parts] = [chunk.index, chunk.totalSize, 0n, []];
    }
    if (chunk.index !== this.index) this.broken(`a chunk of image ${chunk.index} arrived before its last chunk`);
    if (chunk.totalSize !== this.total || chunk.offset !== this.received) this.broken("chunks are missing");
    this.parts.push(chunk.data);
    this.received += BigInt(chunk.data.length);
    const complete = this.received === this.total;
    if (this.received > this.total || complete !== (chunk.image !== undefined)) this.broken("bad chunk sizes");
    if (!complete || !chunk.image) return undefined;
    const data = Buffer.concat(this.parts);
    this.index = -1;
    this.parts = [];
    return { ...chunk.image, data };
  }

  /** Call once the stream has ended: throws if it ended inside a run of chunks. */
  finish(): void {
    if (this.index >= 0) this.broken("the stream ended before its last chunk");
  }

  private broken(what: string): never {
    throw new Error(`image ${this.index} arrived broken: ${what} (${this.received} of ${this.total} bytes)`);
  }
}
