-- The chat buffer: a markdown buffer of `## You` / `## Assistant` sections. `<CR>` (normal mode)
-- sends the conversation to `/v1/chat/completions` with `stream: true`; the answer's tokens are
-- written into the buffer as they arrive; `<C-c>` cancels (the request is dropped, the gateway
-- stops generating). Errors from the gateway are shown with its own message.

local config = require('securellm.config')
local http = require('securellm.http')

local M = {}

local YOU = '## You'
local ASSISTANT = '## Assistant'
local SYSTEM = '## System'

-- The request in flight (one at a time): job, buffer, where the answer starts, its text.
M.current = nil
-- The last finished request: { status, error, text, cancelled, events } (tests read it).
M.last = nil

local function buffer()
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if vim.api.nvim_buf_is_valid(b) and vim.b[b].securellm_chat then
      return b
    end
  end
  return nil
end

local function notify(msg, level)
  vim.notify('SecureLLM: ' .. msg, level or vim.log.levels.INFO)
end

-- The conversation in the buffer as OpenAI messages.
function M.messages(buf)
  local msgs = {}
  local role, lines = nil, {}
  local function flush()
    if role then
      local text = vim.trim(table.concat(lines, '\n'))
      if text ~= '' then
        table.insert(msgs, { role = role, content = text })
      end
    end
  end
  for _, l in ipairs(vim.api.nvim_buf_get_lines(buf, 0, -1, false)) do
    if l == YOU or l == ASSISTANT or l == SYSTEM then
      flush()
      role = (l == YOU and 'user') or (l == ASSISTANT and 'assistant') or 'system'
      lines = {}
    elseif role then
      table.insert(lines, l)
    end
  end
  flush()
  local sys = config.options.system_prompt
  if sys and not (msgs[1] and msgs[1].role == 'system') then
    table.insert(msgs, 1, { role = 'system', content = sys })
  end
  return msgs
end

local function set_keymaps(buf)
  local km = config.options.keymaps
  if km.send then
    vim.keymap.set('n', km.send, function()
      M.send()
    end, { buffer = buf, desc = 'SecureLLM: send' })
  end
  if km.cancel then
    vim.keymap.set({ 'n', 'i' }, km.cancel, function()
      M.cancel()
    end, { buffer = buf, desc = 'SecureLLM: cancel' })
  end
end

-- Open (or show) the chat buffer in a split; returns it.
function M.open()
  local buf = buffer()
  if not buf then
    buf = vim.api.nvim_create_buf(true, true)
    vim.api.nvim_buf_set_name(buf, 'securellm://chat')
    vim.b[buf].securellm_chat = true
    vim.bo[buf].filetype = 'markdown'
    vim.bo[buf].bufhidden = 'hide'
    vim.api.nvim_buf_set_lines(buf, 0, -1, false, { YOU, '' })
    set_keymaps(buf)
  end
  local win = vim.fn.bufwinid(buf)
  if win == -1 then
    vim.cmd('botright vsplit')
    vim.api.nvim_win_set_buf(0, buf)
  else
    vim.api.nvim_set_current_win(win)
  end
  local last = vim.api.nvim_buf_line_count(buf)
  vim.api.nvim_win_set_cursor(0, { last, 0 })
  return buf
end

-- Append `lines` at the end of the buffer.
local function append(buf, lines)
  vim.api.nvim_buf_set_lines(buf, -1, -1, false, lines)
end

-- Write the answer so far into the buffer (from its first line to the end).
local function render(cur)
  if not vim.api.nvim_buf_is_valid(cur.buf) then
    return
  end
  vim.api.nvim_buf_set_lines(cur.buf, cur.start, -1, false, vim.split(cur.text, '\n', { plain = true }))
end

local function finish(cur, status, err, cancelled)
  if M.current ~= cur then
    return
  end
  M.current = nil
  local text = cur.text
  local suffix = {}
  if cancelled then
    table.insert(suffix, '[cancelled]')
  elseif err then
    table.insert(suffix, '[error] ' .. err)
    notify(err, vim.log.levels.ERROR)
  end
  if vim.api.nvim_buf_is_valid(cur.buf) then
    render(cur)
    for _, l in ipairs(suffix) do
      append(cur.buf, { l })
    end
    append(cur.buf, { '', YOU, '' })
  end
  M.last = {
    status = status,
    error = err,
    text = text,
    cancelled = cancelled or false,
    events = cur.events,
    request_id = cur.request_id,
  }
  if cur.on_done then
    cur.on_done(M.last)
  end
end

-- Send the conversation. `opts`: model, max_tokens, request_id (the `x-request-id` header),
-- on_done(result).
function M.send(opts)
  opts = opts or {}
  if M.current then
    notify('a request is already running (cancel it with ' .. tostring(config.options.keymaps.cancel) .. ')')
    return
  end
  local buf = buffer() or M.open()
  local msgs = M.messages(buf)
  if #msgs == 0 or msgs[#msgs].role ~= 'user' then
    notify('write a message under "' .. YOU .. '" first', vim.log.levels.WARN)
    return
  end
  local key, from = config.api_key()
  if not key then
    notify('no API key: ' .. from, vim.log.levels.ERROR)
    return
  end
  local model = opts.model or config.options.model
  if not model then
    notify('no model: set `model` in setup() or pick one with :SecureLLMModels', vim.log.levels.ERROR)
    return
  end
  append(buf, { '', ASSISTANT })
  local cur = {
    buf = buf,
    start = vim.api.nvim_buf_line_count(buf),
    text = '',
    events = 0,
    on_done = opts.on_done,
    request_id = opts.request_id,
  }
  append(buf, { '' })
  local body = {
    model = model,
    messages = msgs,
    stream = true,
    max_tokens = opts.max_tokens or config.options.max_tokens,
    temperature = config.options.temperature,
  }
  local headers = {
    Authorization = 'Bearer ' .. key,
    ['Content-Type'] = 'application/json',
    Accept = 'text/event-stream',
  }
  if opts.request_id then
    headers['x-request-id'] = opts.request_id
  end
  local stream_error = nil
  local job, why = http.request({
    method = 'POST',
    url = config.options.url .. '/v1/chat/completions',
    headers = headers,
    body = vim.json.encode(body),
    on_event = vim.schedule_wrap(function(payload)
      if payload == '[DONE]' or M.current ~= cur then
        return
      end
      local ok, ev = pcall(vim.json.decode, payload)
      if not ok or type(ev) ~= 'table' then
        return
      end
      if type(ev.error) == 'table' then
        -- An error after the stream started (e.g. no GPU memory in time).
        stream_error = ev.error.message
        return
      end
      local choice = ev.choices and ev.choices[1]
      local delta = choice and choice.delta and choice.delta.content
      if type(delta) == 'string' and delta ~= '' then
        cur.text = cur.text .. delta
        cur.events = cur.events + 1
        render(cur)
      end
    end),
    on_done = vim.schedule_wrap(function(status, rest, err)
      if cur.cancelled then
        return finish(cur, status, nil, true)
      end
      if err then
        return finish(cur, status, err, false)
      end
      if status < 200 or status >= 300 then
        return finish(cur, status, http.error_message(status, rest), false)
      end
      finish(cur, status, stream_error, false)
    end),
  })
  if not job then
    cur.text = ''
    M.current = cur
    return finish(cur, 0, why, false)
  end
  cur.job = job
  M.current = cur
  return job
end

-- Cancel the request in flight (the answer so far stays, marked `[cancelled]`).
function M.cancel()
  local cur = M.current
  if not cur then
    return false
  end
  cur.cancelled = true
  http.cancel(cur.job)
  return true
end

-- Add a user message to the chat buffer (opening it) and send it.
function M.ask(text, opts)
  local buf = M.open()
  local lines = vim.api.nvim_buf_get_lines(buf, 0, -1, false)
  -- Reuse an empty trailing `## You` section, else start one.
  local last_you = nil
  for i = #lines, 1, -1 do
    if lines[i] == YOU then
      last_you = i
      break
    end
  end
  local empty_tail = last_you ~= nil
  if last_you then
    for i = last_you + 1, #lines do
      if vim.trim(lines[i]) ~= '' then
        empty_tail = false
      end
    end
  end
  if empty_tail then
    vim.api.nvim_buf_set_lines(buf, last_you, -1, false, {})
  else
    append(buf, { '', YOU })
  end
  append(buf, vim.split(text, '\n', { plain = true }))
  return M.send(opts)
end

return M
