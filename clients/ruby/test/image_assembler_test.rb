# frozen_string_literal: true

# The chunk helper on hand-built streams: ruby test/image_assembler_test.rb (after generating lib/gen).
$LOAD_PATH.unshift(File.join(__dir__, "..", "lib"), File.join(__dir__, "..", "lib", "gen"))
require "minitest/autorun"
require "refinery/v1/generation_pb"
require "image_assembler"

class ImageAssemblerTest < Minitest::Test
  DATA = (0...10_000).map { |i| ((i * 7) % 251).chr }.join.b

  def chunks(index, piece)
    (0...DATA.bytesize).step(piece).map do |offset|
      last = offset + piece >= DATA.bytesize
      chunk = Refinery::V1::ImageChunk.new(
        index: index, offset: offset, total_size: DATA.bytesize, data: DATA.byteslice(offset, piece),
        image: last ? Refinery::V1::Image.new(index: index, width: 2048, seed: 7) : nil
      )
      Refinery::V1::GenerateResponse.new(image_chunk: chunk)
    end
  end

  def run_stream(responses)
    assembler = ImageAssembler.new
    images = responses.filter_map { |r| assembler.feed(r) }
    assembler.finish
    images
  end

  def progress
    Refinery::V1::GenerateResponse.new(progress: Refinery::V1::Progress.new(step: 1))
  end

  def test_chunks_come_back_as_one_image_beside_whole_ones
    whole = Refinery::V1::GenerateResponse.new(image: Refinery::V1::Image.new(index: 1, data: DATA))
    images = run_stream([progress, *chunks(0, 3000), whole, *chunks(2, 4096)])
    assert_equal [[0, 7, DATA], [1, 0, DATA], [2, 7, DATA]], images.map { |i| [i.index, i.seed, i.data] }
  end

  def test_a_stream_that_ends_inside_a_run_is_an_error
    error = assert_raises(ImageAssembler::BrokenImage) { run_stream(chunks(0, 3000)[0...-1]) }
    assert_match(/ended before its last chunk/, error.message)
  end

  def test_another_event_inside_a_run_is_an_error
    run0 = chunks(0, 3000)
    error = assert_raises(ImageAssembler::BrokenImage) { run_stream([run0[0], progress, *run0[1..]]) }
    assert_match(/progress event arrived/, error.message)
  end

  def test_chunks_of_two_images_mixed_are_an_error
    a = chunks(0, 3000)
    b = chunks(1, 3000)
    error = assert_raises(ImageAssembler::BrokenImage) { run_stream([a[0], b[0], *a[1..], *b[1..]]) }
    assert_match(/a chunk of image 1/, error.message)
  end

  def test_a_missing_chunk_is_an_error
    run0 = chunks(0, 3000)
    error = assert_raises(ImageAssembler::BrokenImage) { run_stream([run0[0], *run0[2..]]) }
    assert_match(/chunks are missing/, error.message)
  end
end
