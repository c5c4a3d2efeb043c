-- Drives integrations/neovim in `nvim --headless` against a running stack (tests/e2e/tests/neovim.rs
-- starts the stack and this script, then checks what it wrote). Each scenario uses the plugin as a
-- user would (commands, the chat buffer's keys) and records what the editor showed; the results go
-- to $RESULT_FILE as JSON, then Neovim quits.
--
-- Environment: SECURELLM_URL, SECURELLM_API_KEY, SECURELLM_ADMIN_TOKEN, MODEL (tiny), BIG (a
-- slower model, for cancelling mid-stream), WRONG_KEY, RESULT_FILE.

local results = {}
local function record(name, value)
  results[name] = value
end

local function finish()
  local f = assert(io.open(os.getenv('RESULT_FILE'), 'w'))
  f:write(vim.json.encode(results))
  f:close()
  vim.cmd('qall!')
end

local function guard(name, fn)
  local ok, err = pcall(fn)
  if not ok then
    results.errors = results.errors or {}
    table.insert(results.errors, name .. ': ' .. tostring(err))
  end
end

vim.cmd('runtime! plugin/securellm.lua')
local securellm = require('securellm')
local chat = require('securellm.chat')
local edit = require('securellm.edit')
local status = require('securellm.status')
securellm.setup({ model = os.getenv('MODEL'), max_tokens = 24 })

local notes = {}
local plain_notify = vim.notify
vim.notify = function(msg, level)
  table.insert(notes, { msg = msg, level = level })
end

local function chat_lines()
  for _, b in ipairs(vim.api.nvim_list_bufs()) do
    if vim.b[b].securellm_chat then
      return vim.api.nvim_buf_get_lines(b, 0, -1, false)
    end
  end
  return {}
end

-- Open the chat with `text` as the next message and send it with `opts`; returns the chat buffer
-- and a function that tells the result once the request has ended (nil before).
local function chat_send(text, opts)
  vim.cmd('SecureLLMChat')
  local buf = vim.api.nvim_get_current_buf()
  vim.api.nvim_buf_set_lines(buf, -1, -1, false, { text })
  local done = nil
  opts.on_done = function(r)
    done = r
  end
  chat.send(opts)
  return buf, function()
    return done
  end
end

-- Start `call(on_done)` and wait (at most a minute) for its result.
local function waited(call)
  local done = nil
  call(function(r)
    done = r
  end)
  vim.wait(60000, function()
    return done ~= nil
  end, 10)
  return done
end

-- :checkhealth securellm
guard('health', function()
  vim.cmd('checkhealth securellm')
  record('health', vim.api.nvim_buf_get_lines(0, 0, -1, false))
  vim.cmd('tabclose')
end)

-- Chat: the answer streams into the buffer (seen there before the request ends).
guard('chat', function()
  local seen_partial = false
  local buf, done = chat_send('Say hello.', { request_id = 'nvim-chat' })
  local started = chat.current ~= nil
  vim.wait(60000, function()
    local cur = chat.current
    if cur and cur.events >= 1 then
      -- Tokens so far are in the buffer while the request still runs.
      local text = table.concat(vim.api.nvim_buf_get_lines(buf, cur.start, -1, false), '\n')
      if text ~= '' and text == cur.text then
        seen_partial = true
      end
    end
    return done() ~= nil
  end, 1)
  record('chat', {
    started = started,
    seen_partial = seen_partial,
    result = done(),
    buffer = vim.api.nvim_buf_get_lines(buf, 0, -1, false),
  })
end)

-- Ask about a selection: the question and the lines (fenced) go to the chat, the answer comes.
guard('ask', function()
  vim.cmd('enew')
  vim.bo.filetype = 'lua'
  vim.api.nvim_buf_set_lines(0, 0, -1, false, { 'local x = 1', 'return x + 1' })
  local done = waited(function(on_done)
    edit.ask(1, 2, 'What does this return?', { on_done = on_done })
  end)
  record('ask', { result = done, buffer = chat_lines() })
end)

-- Rewrite a selection in place (the command, as a user runs it on a range).
guard('rewrite', function()
  vim.cmd('enew')
  local original = { 'alpha beta gamma', 'delta' }
  vim.api.nvim_buf_set_lines(0, 0, -1, false, vim.list_extend(vim.deepcopy(original), { 'untouched' }))
  edit.last_rewrite = nil
  vim.cmd('1,2SecureLLMRewrite make it shorter')
  vim.wait(60000, function()
    return edit.last_rewrite ~= nil
  end, 10)
  record('rewrite', {
    original = original,
    result = edit.last_rewrite,
    buffer = vim.api.nvim_buf_get_lines(0, 0, -1, false),
  })
end)

-- Inline completion: shown as virtual text, then accepted into the line.
guard('complete', function()
  vim.cmd('enew')
  vim.api.nvim_buf_set_lines(0, 0, -1, false, { 'The quick brown' })
  vim.api.nvim_win_set_cursor(0, { 1, 15 })
  local done = waited(function(on_done)
    edit.complete({ on_done = on_done })
  end)
  local ns = vim.api.nvim_create_namespace('securellm_completion')
  local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
  local shown = marks[1] and marks[1][4] and marks[1][4].virt_text and marks[1][4].virt_text[1][1] or nil
  vim.cmd('SecureLLMAccept')
  record('complete', {
    result = done,
    shown = shown,
    buffer = vim.api.nvim_buf_get_lines(0, 0, -1, false),
  })
end)

-- :SecureLLMModels: the list from /v1/models, the pick becomes the model.
guard('models', function()
  local offered = nil
  local plain_select = vim.ui.select
  vim.ui.select = function(items, _, on_choice)
    offered = items
    on_choice(os.getenv('BIG'))
  end
  local chosen = false
  vim.cmd('SecureLLMModels')
  vim.wait(30000, function()
    return require('securellm.config').options.model == os.getenv('BIG')
  end, 10)
  chosen = require('securellm.config').options.model
  vim.ui.select = plain_select
  record('models', { offered = offered, chosen = chosen })
end)

-- Cancel with the chat buffer's key while the slower model streams a long answer.
guard('cancel', function()
  local buf, done = chat_send('Tell me a very long story.', {
    model = os.getenv('BIG'),
    max_tokens = 4000,
    request_id = 'nvim-cancel',
  })
  vim.wait(60000, function()
    return done() ~= nil or (chat.current ~= nil and chat.current.events >= 2)
  end, 1)
  local events_before = chat.current and chat.current.events or -1
  vim.api.nvim_set_current_win(vim.fn.bufwinid(buf))
  vim.api.nvim_feedkeys(vim.api.nvim_replace_termcodes('<C-c>', true, false, true), 'x', false)
  vim.wait(30000, function()
    return done() ~= nil
  end, 10)
  record('cancel', {
    events_before = events_before,
    result = done(),
    buffer_tail = vim.api.nvim_buf_get_lines(buf, 0, -1, false),
  })
end)

-- A wrong key: the gateway's own message reaches the user (notification and chat buffer).
guard('wrong_key', function()
  local good = vim.env.SECURELLM_API_KEY
  vim.env.SECURELLM_API_KEY = os.getenv('WRONG_KEY')
  notes = {}
  local _, done = chat_send('hello?', { model = os.getenv('MODEL') })
  vim.wait(30000, function()
    return done() ~= nil
  end, 10)
  vim.env.SECURELLM_API_KEY = good
  record('wrong_key', { result = done(), notes = notes, buffer = chat_lines() })
end)

-- :SecureLLMStatus: the floating window shows the loaded models.
guard('status', function()
  status.last = nil
  vim.cmd('SecureLLMStatus')
  vim.wait(30000, function()
    return status.last ~= nil
  end, 10)
  local floating = false
  for _, w in ipairs(vim.api.nvim_list_wins()) do
    if vim.api.nvim_win_get_config(w).relative ~= '' then
      floating = true
    end
  end
  local lines = status.last and status.last.buf and vim.api.nvim_buf_is_valid(status.last.buf)
      and vim.api.nvim_buf_get_lines(status.last.buf, 0, -1, false)
    or nil
  record('status', { floating = floating, lines = lines, error = status.last and status.last.error })
end)

vim.notify = plain_notify
finish()
