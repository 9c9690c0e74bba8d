# frozen_string_literal: true

# Refinery from Ruby: stream a refined generation (a LoRA on each stage, a compel-weighted prompt) with its
# progress, save the image and say what the server applied, then show how a bad request is refused
# (google.rpc.BadRequest names the field).
#
#   ruby generate.rb [HOST:PORT] [OUT.png]      (after: rake generate in clients/ruby, which writes lib/gen)
$LOAD_PATH.unshift(File.join(__dir__, "lib"), File.join(__dir__, "lib", "gen"))
require "grpc"
require "google/protobuf/well_known_types"
require "google/rpc/error_details_pb" # from googleapis-common-protos-types, which ruby-grpc depends on
require "refinery/v1/generation_services_pb"
require "image_assembler"
require "refinery_metadata"

target = ARGV[0] || "localhost:50051"
out = ARGV[1] || "lighthouse.png"
# The default 4 MiB receive limit is enough: Refinery sends images over 3 MiB in chunks.
stub = Refinery::V1::GenerationService::Stub.new(target, :this_channel_is_insecure)

request = Refinery::V1::GenerateRequest.new(
  request_id: "example-ruby-1", # echoed on every response and in the server's log; empty: one is assigned
  positive_prompt: "a lighthouse on a cliff at (dusk)1.2, (fog)0.8", # compel syntax: a weight after ( )
  prompt_weighting: :PROMPT_WEIGHTING_COMPEL, # unset: plain text, every character part of the prompt
  steps: 20,
  seed: 7, # uint64: an Integer in Ruby
  loras: [Refinery::V1::Lora.new(model: "builtin:tiny-lora-base@1", weight: 0.8)], # the base's alone; unset: 1
  refiner: Refinery::V1::Refiner.new(
    start_step_percentage: 90, # no model: the server's default refiner
    loras: [Refinery::V1::Lora.new(model: "builtin:tiny-lora-refiner@1")] # trained on the refiner's own UNet
  )
)

# What the server applied and read: the LoRAs of each stage as canonical AIRs with the weights used, and per
# text encoder the tokens of the prompt and the negative prompt, in 75-token windows.
def report(image)
  # A weight is a float32 on the wire: 0.8 comes back as 0.800000011920929 unless rounded.
  listed = lambda do |loras|
    named = loras.map { |lora| "#{lora.model} (weight #{format("%g", lora.has_weight? ? lora.weight : 1.0)})" }
    named.empty? ? "none" : named.join(", ")
  end
  puts "loras: base #{listed.call(image.loras)}; refiner #{listed.call(image.refiner_loras)}"
  image.prompt_tokens.each do |read|
    puts "#{read.stage} #{read.text_encoder}: #{read.positive_tokens} + #{read.negative_tokens} tokens " \
         "in #{read.chunks} window(s)"
  end
end
images = ImageAssembler.new
stub.generate(request, metadata: RefineryMetadata.for(request), deadline: Time.now + 600).each do |response|
  case response.event
  when :queued
    puts "queued: position #{response.queued.position} of #{response.queued.queue_depth}"
  when :progress
    step = response.progress
    puts "#{step.stage} #{step.step}/#{step.stage_steps} (step #{step.overall_step}/#{step.total_steps})"
  end
  image = images.feed(response) # a whole image: from an image event or its last chunk
  next unless image

  File.binwrite(out, image.data)
  puts "wrote #{out} (#{image.width}x#{image.height}, seed #{image.seed}, request #{response.request_id})"
  puts "#{image.base_steps} base + #{image.refiner_steps} refiner steps"
  report(image)
end
images.finish

# A bad request: the refiner cannot take over at step 30 of 20.
bad = Refinery::V1::GenerateRequest.new(positive_prompt: "a cat", steps: 20,
                                        refiner: Refinery::V1::Refiner.new(start_step: 30))
begin
  stub.generate(bad, metadata: RefineryMetadata.for(bad)).each { |_| nil }
  abort "the server accepted a bad request"
rescue GRPC::BadStatus => e
  puts "refused: #{e.code} (#{e.class.name.split('::').last}): #{e.details}"
  e.to_rpc_status&.details&.each do |detail|
    bad_request = detail.unpack(Google::Rpc::BadRequest)
    bad_request&.field_violations&.each { |v| puts "  #{v.field}: #{v.description}" }
  end
end
