# frozen_string_literal: true

# Results larger than 3 MiB arrive as a run of image_chunk events instead of one image (the rules are in
# generation.proto, ImageChunk). ImageAssembler puts them back together, and refuses a broken run: bytes that
# broke off are not an image and are never returned as one.
class ImageAssembler
  class BrokenImage < StandardError; end

  def initialize
    @index = nil # the result being assembled
  end

  # The whole Refinery::V1::Image this response completes (an image, or the last chunk of a run), else nil.
  def feed(response)
    event = response.event
    unless event == :image_chunk
      broken("a #{event} event arrived before its last chunk") if @index
      return event == :image ? response.image : nil
    end
    chunk = response.image_chunk
    @index, @total, @data = chunk.index, chunk.total_size, String.new(encoding: Encoding::BINARY) if @index.nil?
    broken("a chunk of image #{chunk.index} arrived before its last chunk") if chunk.index != @index
    broken("chunks are missing") if chunk.total_size != @total || chunk.offset != @data.bytesize
    @data << chunk.data
    complete = @data.bytesize == @total
    broken("bad chunk sizes") if @data.bytesize > @total || complete != !chunk.image.nil?
    return nil unless complete

    image = chunk.image.dup
    image.data = @data
    @index = nil
    image
  end

  # Call once the stream has ended: raises if it ended inside a run of chunks.
  def finish
    broken("the stream ended before its last chunk") if @index
  end

  private

  def broken(what)
    message = "image #{@index} arrived broken: #{what} (#{@data.bytesize} of #{@total} bytes)"
    @index = nil
    raise BrokenImage, message
  end
end
