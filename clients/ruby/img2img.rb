# frozen_string_literal: true

# Refinery from Ruby, starting from an image: upload a PNG through UploadImage (a client-streaming call: a header
# with the file's size and sha256, then its bytes in 64 KiB messages), then run img2img over it with a refiner,
# keep the result on the server, and save it.
#
#   ruby img2img.rb [HOST:PORT] [OUT.png] [IN.png]      (after: rake generate in clients/ruby, which writes lib/gen)
#
# IN.png: a PNG, JPEG or WebP whose sides are multiples of 8 (e.g. a result of generate.rb).
$LOAD_PATH.unshift(File.join(__dir__, "lib"), File.join(__dir__, "lib", "gen"))
require "digest"
require "grpc"
require "refinery/v1/generation_services_pb"
require "image_assembler"
require "refinery_metadata"

target = ARGV[0] || "localhost:50051"
out = ARGV[1] || "img2img.png"
input = ARGV[2] || "lighthouse.png"
CHUNK_BYTES = 64 * 1024 # the server refuses a message over 128 KiB
stub = Refinery::V1::GenerationService::Stub.new(target, :this_channel_is_insecure)

request = Refinery::V1::GenerateRequest.new(
  request_id: "example-ruby-img2img",
  positive_prompt: "a lighthouse on a cliff at dawn, oil painting",
  steps: 20,
  seed: 7,
  strength: 0.5, # the last floor(20 x 0.5) = 10 steps of the 20-step grid run: steps 11..20
  refiner: Refinery::V1::Refiner.new(start_step_percentage: 90), # the base runs 11..18, the refiner 19..20
  keep_results: Google::Protobuf::Duration.new(seconds: 600) # keep the result 10 minutes: Image#reference
)

# The header first: the size lets the server refuse a file over its limits or quota before storing a byte, and
# the sha256 lets it tell a broken stream from the file. Digest::SHA256.file reads the file in blocks, and the
# bytes are read again to send them, so the file is never held whole in memory.
header = Refinery::V1::UploadHeader.new(
  size_bytes: File.size(input),
  sha256: Digest::SHA256.file(input).hexdigest,
  keep_for: Google::Protobuf::Duration.new(seconds: 600)
)
messages = Enumerator.new do |stream|
  stream << Refinery::V1::UploadImageRequest.new(header: header)
  File.open(input, "rb") do |file|
    while (chunk = file.read(CHUNK_BYTES))
      stream << Refinery::V1::UploadImageRequest.new(data: chunk)
    end
  end
end
# Sent with the pair of the request that will use the image, so a balancer routing by pair puts both together.
stored = stub.upload_image(messages, metadata: RefineryMetadata.for(request), deadline: Time.now + 60)
expires = Time.at(stored.expires.seconds).utc
puts "uploaded #{input} as #{stored.reference} (#{stored.width}x#{stored.height}, kept until #{expires})"

# A small image (at most 96 KiB) may instead go inline: Refinery::V1::ImageInput.new(data: File.binread(path)).
request.image = Refinery::V1::ImageInput.new(reference: stored.reference)
images = ImageAssembler.new
stub.generate(request, metadata: RefineryMetadata.for(request), deadline: Time.now + 600).each do |response|
  # Progress counts the steps that run (total_steps 10 here), not the 20-step grid.
  puts "step #{response.progress.overall_step}/#{response.progress.total_steps}" if response.event == :progress
  image = images.feed(response)
  next unless image

  File.binwrite(out, image.data)
  puts "wrote #{out} (#{image.width}x#{image.height}, seed #{image.seed})"
  mode = image.mode.to_s.delete_prefix("IMAGE_MODE_").downcase # img2img, inpaint; unspecified: text-to-image
  puts "#{mode} from step #{image.first_step}: #{image.base_steps} base + #{image.refiner_steps} refiner steps"
  puts "kept as #{image.reference}"
end
images.finish
