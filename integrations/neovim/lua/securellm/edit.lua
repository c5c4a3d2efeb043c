-- Working on a selection: ask about it in the chat buffer, or rewrite it in place; and inline
-- completion from `/v1/completions` shown as virtual text, accepted or dismissed.

local config = require('securellm.config')
local http = require('securellm.http')
local chat = require('securellm.chat')

local M = {}

local function notify(msg, level)
  vim.notify('SecureLLM: ' .. msg, level or vim.log.levels.INFO)
end

local function lines_of(buf, first, last)
  return vim.api.nvim_buf_get_lines(buf, first - 1, last, false)
end

local function fenced(buf, lines)
  local ft = vim.bo[buf].filetype or ''
  local out = { '```' .. ft }
  vim.list_extend(out, lines)
  table.insert(out, '```')
  return table.concat(out, '\n')
end

-- Ask `question` about lines first..last of the current buffer, in the chat buffer.
function M.ask(first, last, question, opts)
  local buf = vim.api.nvim_get_current_buf()
  local q = vim.trim(question or '')
  if q == '' then
    q = 'Explain this.'
  end
  return chat.ask(q .. '\n\n' .. fenced(buf, lines_of(buf, first, last)), opts)
end

-- The answer without a surrounding code fence, as lines.
local function unfence(text)
  local lines = vim.split(vim.trim(text), '\n', { plain = true })
  if #lines >= 2 and lines[1]:match('^```') and lines[#lines]:match('^```%s*$') then
    table.remove(lines, 1)
    table.remove(lines, #lines)
  end
  return lines
end

-- The last rewrite: { status, error, lines } (tests read it).
M.last_rewrite = nil

-- Replace lines first..last of the current buffer with the model's rewrite per `instruction`.
-- The buffer is changed only when the answer arrives (and only if those lines did not change
-- meanwhile); an error leaves it as it was and shows the gateway's message.
function M.rewrite(first, last, instruction, opts)
  opts = opts or {}
  local buf = vim.api.nvim_get_current_buf()
  local original = lines_of(buf, first, last)
  local model = opts.model or config.options.model
  if not model then
    notify('no model: set `model` in setup() or pick one with :SecureLLMModels', vim.log.levels.ERROR)
    return
  end
  local tick = vim.api.nvim_buf_get_changedtick(buf)
  local body = {
    model = model,
    max_tokens = opts.max_tokens or config.options.max_tokens,
    temperature = config.options.temperature,
    messages = {
      {
        role = 'system',
        content = 'Rewrite the text the user gives as the instruction says. Answer with the rewritten text only, no explanation.',
      },
      { role = 'user', content = (instruction or 'Improve it.') .. '\n\n' .. fenced(buf, original) },
    },
  }
  return http.json('POST', '/v1/chat/completions', body, 'api', function(r, err, status)
    local result = { status = status, error = err }
    if r then
      local msg = r.choices and r.choices[1] and r.choices[1].message
      local text = msg and msg.content or ''
      if vim.api.nvim_buf_get_changedtick(buf) ~= tick then
        result.error = 'the buffer changed while the rewrite ran; nothing replaced'
      else
        result.lines = unfence(text)
        vim.api.nvim_buf_set_lines(buf, first - 1, last, false, result.lines)
      end
    end
    if result.error then
      notify(result.error, vim.log.levels.ERROR)
    end
    M.last_rewrite = result
    if opts.on_done then
      opts.on_done(result)
    end
  end)
end

-- ---- Inline completion ----

local ns = vim.api.nvim_create_namespace('securellm_completion')

-- The suggestion shown: { buf, row, col, text, job }.
M.suggestion = nil
M.last_completion = nil

function M.dismiss()
  local s = M.suggestion
  if s then
    http.cancel(s.job)
    if vim.api.nvim_buf_is_valid(s.buf) then
      vim.api.nvim_buf_clear_namespace(s.buf, ns, 0, -1)
    end
  end
  M.suggestion = nil
end

local function show(s)
  local lines = vim.split(s.text, '\n', { plain = true })
  local mark = { virt_text = { { lines[1], 'Comment' } }, virt_text_pos = 'eol' }
  if #lines > 1 then
    local extra = {}
    for i = 2, #lines do
      table.insert(extra, { { lines[i], 'Comment' } })
    end
    mark.virt_lines = extra
  end
  vim.api.nvim_buf_set_extmark(s.buf, ns, s.row, 0, mark)
end

-- Ask `/v1/completions` for what follows the cursor; show it as virtual text. `opts.on_done(s)`.
function M.complete(opts)
  opts = opts or {}
  M.dismiss()
  local model = opts.model or config.options.model
  if not model then
    notify('no model: set `model` in setup() or pick one with :SecureLLMModels', vim.log.levels.ERROR)
    return
  end
  local c = config.options.completion
  local buf = vim.api.nvim_get_current_buf()
  local pos = vim.api.nvim_win_get_cursor(0)
  local row, col = pos[1] - 1, pos[2]
  -- In normal mode the text goes after the character under the cursor (as `a` appends).
  local here = vim.api.nvim_buf_get_lines(buf, row, row + 1, false)[1] or ''
  if vim.api.nvim_get_mode().mode:sub(1, 1) == 'n' and #here > 0 then
    col = math.min(col + 1, #here)
  end
  local first = math.max(0, row - c.context_lines)
  local before = vim.api.nvim_buf_get_lines(buf, first, row + 1, false)
  before[#before] = before[#before]:sub(1, col)
  local body = {
    model = model,
    prompt = table.concat(before, '\n'),
    max_tokens = opts.max_tokens or c.max_tokens,
    temperature = config.options.temperature,
  }
  if c.fim then
    local after = vim.api.nvim_buf_get_lines(buf, row, row + 1 + c.context_lines, false)
    after[1] = after[1]:sub(col + 1)
    body.suffix = table.concat(after, '\n')
  end
  local s = { buf = buf, row = row, col = col, text = '' }
  M.suggestion = s
  s.job = http.json('POST', '/v1/completions', body, 'api', function(r, err, status)
    if M.suggestion ~= s then
      return
    end
    s.job = nil
    M.last_completion = { status = status, error = err }
    if err then
      M.suggestion = nil
      notify(err, vim.log.levels.ERROR)
    else
      s.text = (r.choices and r.choices[1] and r.choices[1].text) or ''
      M.last_completion.text = s.text
      if s.text == '' then
        M.suggestion = nil
      else
        show(s)
      end
    end
    if opts.on_done then
      opts.on_done(M.last_completion)
    end
  end)
  return s.job
end

-- Insert the suggestion at the place it was asked for.
function M.accept()
  local s = M.suggestion
  if not s or s.text == '' or not vim.api.nvim_buf_is_valid(s.buf) then
    return false
  end
  M.dismiss()
  local line = vim.api.nvim_buf_get_lines(s.buf, s.row, s.row + 1, false)[1] or ''
  local lines = vim.split(s.text, '\n', { plain = true })
  local head, tail = line:sub(1, s.col), line:sub(s.col + 1)
  lines[1] = head .. lines[1]
  lines[#lines] = lines[#lines] .. tail
  vim.api.nvim_buf_set_lines(s.buf, s.row, s.row + 1, false, lines)
  return true
end

return M
