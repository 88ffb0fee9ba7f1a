-- Metering inside Envoy: reads an admitted call's response as it streams past, without
-- buffering it and without a message to the sidecar per chunk, and leaves what the sidecar's
-- parsers need in dynamic metadata (namespace `sidecar.metering`). The gRPC access log sends
-- that to the sidecar once per request, where usage is read and the call charged
-- (sidecar/envoy/access_log.py).
--
-- Keys: rid (the reservation), path, route, provider, model (which API answers, and the
-- price should the store be down), content_type, content_encoding, c1..cN (the body as it
-- passed, in pieces of about GROUP_BYTES, with every byte >= 0x80 replaced by `~` so the
-- metadata is valid UTF-8 whatever the body holds: parsers see the same JSON structure and
-- count the same text bytes; base64 instead when the body is compressed or binary, and then
-- `base64` is true), chunks (N), bytes (how many bytes passed: every one once the body
-- ended or outgrew what is kept; until then the first chunk's, which tells the sidecar a
-- body began, and costs no metadata write per chunk), tail (the last chunks once more than
-- MAX_KEPT bytes passed), done (the body ended; absent when the client or the upstream went
-- away first), and with done: head and end (the body's first HEAD_BYTES and at least its
-- last END_BYTES, from end_offset on). Each key is set as soon as it is known, so a stream
-- cut short still reports what passed until then.
--
-- A finished event stream whose last events carry the provider's usage report needs no more
-- than its first event (head) and its last TAIL_EVENTS events (end, starting at an event's
-- start): the pieces are then emptied and `trimmed` is set, so the record the sidecar
-- receives (and Envoy buffers for it) has the same small size however many chunks the
-- answer had.
--
-- A chunk only extends the current piece (O(piece) work, never the body so far again), and
-- the stream's metadata object is fetched afresh after every yield: Envoy invalidates
-- handles across the coroutine's yields.

local NS = "sidecar.metering"
local MAX_KEPT = 1048576
local TAIL_CHUNKS = 16
local MAX_HELD = 65536
-- Of a body that ended: its first and its last bytes, where every metered API reports its
-- usage. The sidecar reads these first; the chunks only if they do not hold final usage.
local HEAD_BYTES = 2048
local END_BYTES = 4096
-- A piece of the kept body is closed once it holds this many bytes.
local GROUP_BYTES = 4096
-- As the sidecar reads a finished stream (sidecar/metering/record.py, TAIL_EVENTS).
local TAIL_EVENTS = 4

function envoy_on_request(handle)
  local headers = handle:headers()
  local rid = headers:get("x-sidecar-request-id")
  if rid == nil then
    return
  end
  -- The reservation id stops here: neither the provider nor the client ever learns it.
  headers:remove("x-sidecar-request-id")
  -- Usage is read from the body as it is on the wire: ask for it uncompressed.
  headers:replace("accept-encoding", "identity")
  local md = handle:streamInfo():dynamicMetadata()
  md:set(NS, "rid", rid)
  md:set(NS, "path", headers:get(":path") or "")
  md:set(NS, "route", headers:get("x-sidecar-route") or "")
  md:set(NS, "provider", headers:get("x-sidecar-provider") or "")
  md:set(NS, "model", headers:get("x-sidecar-model") or "")
  -- The Check asks for `stream_options.include_usage` on an OpenAI chat stream whose body
  -- has no `stream_options`: inserted here as the object's first member (the rest of the
  -- body stays as sent), and the client, who did not ask for usage, will not see its event.
  -- Every other body change is ext_proc's (sidecar/metering/request_body.py decides).
  local authz = md:get("envoy.filters.http.ext_authz")
  local decided = authz and authz["sidecar"]
  if decided == nil or decided["body"] ~= "insert_usage_option" then
    return
  end
  local body = handle:body()
  local raw = body:getBytes(0, body:length())
  local _, brace = string.find(raw, "^%s*{")
  if brace == nil then
    return
  end
  local new = string.sub(raw, 1, brace) .. '"stream_options":{"include_usage":true},'
    .. string.sub(raw, brace + 1)
  body:setBytes(new)
  -- Handles taken before body() are stale after its yield.
  handle:headers():replace("content-length", tostring(#new))
  handle:streamInfo():dynamicMetadata():set(NS, "strip", true)
end

-- The index of the last byte of the first SSE event end (a blank line, in any line-break
-- style) at or after `from`, or nil. Line breaks are looked for with plain finds (a pattern
-- with a character class costs LuaJIT over a hundred instructions a byte, a plain find a
-- few), the next "\r" and the next "\n" each found again only once passed.
local function event_end(data, from)
  local pos = from
  local nl = string.find(data, "\n", pos, true)
  local cr = string.find(data, "\r", pos, true)
  while true do
    if nl ~= nil and nl < pos then
      nl = string.find(data, "\n", pos, true)
    end
    if cr ~= nil and cr < pos then
      cr = string.find(data, "\r", pos, true)
    end
    local s = nl
    if s == nil or (cr ~= nil and cr < s) then
      s = cr
    end
    if s == nil then
      return nil
    end
    local e = s
    if string.byte(data, s) == 13 and string.byte(data, s + 1) == 10 then
      e = s + 1
    end
    local nxt = string.byte(data, e + 1)
    if nxt == 10 then
      return e + 1
    end
    if nxt == 13 then
      if string.byte(data, e + 2) == 10 then
        return e + 2
      end
      return e + 1
    end
    pos = e + 1
  end
end

-- The last byte of each whole SSE event of `data`, in order.
local function event_ends(data)
  local ends, pos = {}, 1
  while true do
    local e = event_end(data, pos)
    if e == nil then
      return ends
    end
    ends[#ends + 1] = e
    pos = e + 1
  end
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = string.byte(data, i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local s1, s2 = math.floor(n / 262144), math.floor(n / 4096) % 64
    local s3, s4 = math.floor(n / 64) % 64, n % 64
    out[#out + 1] = string.sub(B64, s1 + 1, s1 + 1) .. string.sub(B64, s2 + 1, s2 + 1)
      .. (b and string.sub(B64, s3 + 1, s3 + 1) or "=")
      .. (c and string.sub(B64, s4 + 1, s4 + 1) or "=")
  end
  return table.concat(out)
end

-- Whether `s` holds a byte >= 0x80: a loop over its bytes, which LuaJIT compiles to a few
-- instructions a byte, where `string.find(s, "[\128-\255]")` took over a hundred (it was
-- most of this filter's cost).
local byte = string.byte
local function has_high_byte(s)
  for i = 1, #s do
    if byte(s, i) > 127 then
      return true
    end
  end
  return false
end

local function encode(raw, compressed)
  if compressed then
    return base64(raw)
  end
  -- Looking costs less than gsub building a copy, and most chunks are ASCII.
  if not has_high_byte(raw) then
    return raw
  end
  return (string.gsub(raw, "[\128-\255]", "~"))
end

-- Whether `data` holds `key` followed by `rest` (a pattern anchored after the key): the
-- key is found with plain finds, the pattern tried only where it is.
local function has_member(data, key, rest)
  local pos = 1
  while true do
    local _, e = string.find(data, key, pos, true)
    if e == nil then
      return false
    end
    if string.find(data, rest, e + 1) ~= nil then
      return true
    end
    pos = e + 1
  end
end

-- The usage chunk the sidecar asked for: `"choices": []` and a `usage` object.
local function is_usage_event(event)
  return has_member(event, '"usage"', "^%s*:%s*{")
    and has_member(event, '"choices"', "^%s*:%s*%[%s*%]")
end

-- The last TAIL_EVENTS whole events of `data`, as the sidecar picks them; `whole`: `data`
-- starts at the body's first byte (so at an event's start).
local function last_events(data, whole)
  local ends = event_ends(data)
  if #ends > TAIL_EVENTS then
    return string.sub(data, ends[#ends - TAIL_EVENTS] + 1)
  end
  if whole then
    return data
  end
  if #ends == 0 then
    return ""
  end
  return string.sub(data, ends[1] + 1)
end

-- Every metered event stream reports its final usage in one of its last events (OpenAI's
-- usage chunk, Anthropic's last `message_delta`, the Responses API's `response.completed`,
-- Gemini's `usageMetadata`).
local function reports_usage(events)
  return has_member(events, '"usage"', "^%s*:%s*{")
    or has_member(events, '"usageMetadata"', "^%s*:%s*{")
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if meta == nil or meta["rid"] == nil then
    return
  end
  local headers = handle:headers()
  local content_type = headers:get("content-type") or ""
  local encoding = headers:get("content-encoding") or ""
  local md = handle:streamInfo():dynamicMetadata()
  md:set(NS, "content_type", content_type)
  md:set(NS, "content_encoding", encoding)
  -- Bytes that are not text go as base64: a compressed body (a provider may compress
  -- despite `accept-encoding: identity`) or a binary one (Bedrock's event stream).
  local lowered = string.lower(content_type)
  local compressed = (encoding ~= "" and encoding ~= "identity")
    or not (string.find(lowered, "json", 1, true) or string.find(lowered, "text/", 1, true))
  if compressed then
    md:set(NS, "base64", true)
  end
  -- Usage was turned on for a client that did not ask for it (here, or by ext_proc): the
  -- client gets the stream without that one event.
  local body = handle:streamInfo():dynamicMetadata():get("sidecar.body")
  local strip = (meta["strip"] == true or (body ~= nil and body["strip_usage"] == true))
    and string.find(content_type, "text/event-stream", 1, true) ~= nil
    and (encoding == "" or encoding == "identity")
  if strip then
    headers:remove("content-length")
  end
  local n, kept, total, held = 0, 0, 0, ""
  local piece, piece_len = {}, 0
  local tail = {}
  local head, head_len = {}, 0
  -- The last chunks, last[last_from .. n_last], at least END_BYTES of them.
  local last, last_len, last_from, n_last = {}, 0, 1, 0
  for chunk in handle:bodyChunks() do
    local size = chunk:length()
    if size > 0 then
      local raw = chunk:getBytes(0, size)
      local m = handle:streamInfo():dynamicMetadata()
      total = total + size
      if kept + size <= MAX_KEPT then
        kept = kept + size
        if piece_len == 0 then
          n = n + 1
          m:set(NS, "chunks", n)
        end
        local enc = encode(raw, compressed)
        if compressed then
          -- base64 of a piece is not the pieces' base64 joined: one key per chunk here.
          m:set(NS, "c" .. n, enc)
        else
          piece[#piece + 1] = enc
          piece_len = piece_len + #enc
          m:set(NS, "c" .. n, table.concat(piece))
        end
        if compressed or piece_len >= GROUP_BYTES then
          piece, piece_len = {}, 0
        end
      else
        tail[#tail + 1] = raw
        if #tail > TAIL_CHUNKS then
          table.remove(tail, 1)
        end
        m:set(NS, "tail", encode(table.concat(tail), compressed))
        m:set(NS, "bytes", total)
      end
      if total == size then
        m:set(NS, "bytes", total)
      end
      if head_len < HEAD_BYTES then
        head[#head + 1] = raw
        head_len = head_len + size
      end
      n_last = n_last + 1
      last[n_last] = raw
      last_len = last_len + size
      while last_len - #last[last_from] >= END_BYTES do
        last_len = last_len - #last[last_from]
        last[last_from] = nil
        last_from = last_from + 1
      end
      -- Most chunks are whole events without a usage report: they pass as they are,
      -- without being cut into events (that cost more than all the rest per chunk). A
      -- chunk is taken apart when it holds "usage", does not end with a blank line
      -- ("\n\n", "\r\n\r\n": the end of an event), or follows one that ended inside an
      -- event (`held`). A usage event cut in pieces is caught either way: every piece but
      -- the last ends inside it, and every piece but the first follows one that did.
      if strip and (held ~= "" or string.find(raw, '"usage"', 1, true)
                    or not (string.sub(raw, -2) == "\n\n" or string.sub(raw, -4) == "\r\n\r\n")) then
        local data = held .. raw
        local out, start, dropped = {}, 1, false
        for _, e in ipairs(event_ends(data)) do
          local event = string.sub(data, start, e)
          if is_usage_event(event) then
            dropped = true
          else
            out[#out + 1] = event
          end
          start = e + 1
        end
        local was_held = held ~= ""
        held = string.sub(data, start)
        if #held > MAX_HELD then
          out[#out + 1] = held
          held = ""
        end
        -- A chunk of whole events, none of them dropped, passes as it is (no copy).
        if dropped or was_held or held ~= "" then
          chunk:setBytes(table.concat(out))
        end
      end
    end
  end
  local m = handle:streamInfo():dynamicMetadata()
  if not compressed then
    local first = encode(string.sub(table.concat(head), 1, HEAD_BYTES), false)
    local ending = encode(table.concat(last, "", last_from, n_last), false)
    local first_end = event_end(first, 1)
    local events = last_events(ending, total == last_len)
    if n > 0 and kept == total and first_end ~= nil and events ~= ""
        and string.find(lowered, "event-stream", 1, true) and reports_usage(events) then
      -- Only what the sidecar reads of a finished stream: its first event and its last.
      for i = 1, n do
        m:set(NS, "c" .. i, "")
      end
      m:set(NS, "trimmed", true)
      m:set(NS, "head", string.sub(first, 1, first_end))
      m:set(NS, "end", events)
      m:set(NS, "end_offset", total - #events)
    else
      m:set(NS, "head", first)
      m:set(NS, "end", ending)
      m:set(NS, "end_offset", total - last_len)
    end
  end
  m:set(NS, "bytes", total)
  m:set(NS, "done", true)
end
