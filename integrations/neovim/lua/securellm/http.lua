-- HTTP through `curl` in a job (`vim.fn.jobstart`): works from Neovim 0.7 (no `vim.system`), never
-- blocks the editor, and a request is cancelled by stopping its job (curl closes the connection;
-- the gateway stops the generation and audits the request as 499).
--
-- The credential is not on curl's command line (where `ps` shows it): the headers go through a
-- temporary file of mode 0600 that is removed when the job ends; the body goes through stdin.

local M = {}

local STATUS_MARK = '__SECURELLM_HTTP_STATUS__:'

local function header_file(headers)
  local path = vim.fn.tempname()
  local f = io.open(path, 'w')
  if not f then
    return nil
  end
  f:close()
  vim.fn.setfperm(path, 'rw-------')
  f = io.open(path, 'w')
  for k, v in pairs(headers) do
    f:write(k .. ': ' .. v .. '\n')
  end
  f:close()
  return path
end

-- The message of an OpenAI-shaped error body, else the body itself (or the curl failure).
function M.error_message(status, body)
  local ok, decoded = pcall(vim.json.decode, body or '')
  if ok and type(decoded) == 'table' and type(decoded.error) == 'table' and decoded.error.message then
    return decoded.error.message
  end
  body = vim.trim(body or '')
  if body == '' then
    return 'HTTP ' .. tostring(status)
  end
  return body
end

-- Start a request. `opts`:
--   method, url, headers (table), body (string or nil), timeout_s,
--   on_event(data)        for `text/event-stream` answers: each `data:` payload as it arrives
--                         (`[DONE]` included); comments are skipped;
--   on_done(status, body, err)  once: the HTTP status (0 when none), the body that was not an
--                         event, and curl's error text when it failed.
-- Returns the job id (> 0), or nil and why.
function M.request(opts)
  local cfg = require('securellm.config').options
  local hfile = header_file(opts.headers or {})
  if not hfile then
    return nil, 'cannot write a temporary header file'
  end
  local cmd = {
    cfg.curl,
    '--silent',
    '--show-error',
    '--no-buffer',
    '--max-time',
    tostring(opts.timeout_s or cfg.timeout_s),
    '--request',
    opts.method or 'GET',
    '--header',
    '@' .. hfile,
    '--write-out',
    '\n' .. STATUS_MARK .. '%{http_code}\n',
  }
  if opts.body then
    table.insert(cmd, '--data-binary')
    table.insert(cmd, '@-')
  end
  table.insert(cmd, opts.url)

  local partial = ''
  local body_lines = {}
  local status = 0
  local stderr = {}
  local finished = false

  local function line(l)
    l = l:gsub('\r$', '')
    local st = l:match('^' .. STATUS_MARK .. '(%d+)$')
    if st then
      status = tonumber(st)
    elseif opts.on_event and l:sub(1, 5) == 'data:' then
      local payload = l:sub(6):gsub('^ ', '')
      opts.on_event(payload)
    elseif opts.on_event and (l == '' or l:sub(1, 1) == ':') then
      -- Event separators and comments (`: loading model=…`, `: queued position=…`).
      return
    else
      table.insert(body_lines, l)
    end
  end

  local function on_stdout(_, data)
    if not data then
      return
    end
    -- Neovim splits the output into lines; the first continues the last partial one.
    data[1] = partial .. data[1]
    partial = data[#data]
    for i = 1, #data - 1 do
      line(data[i])
    end
  end

  local job = vim.fn.jobstart(cmd, {
    on_stdout = on_stdout,
    on_stderr = function(_, data)
      for _, l in ipairs(data or {}) do
        if l ~= '' then
          table.insert(stderr, l)
        end
      end
    end,
    on_exit = function(_, code)
      os.remove(hfile)
      if partial ~= '' then
        line(partial)
        partial = ''
      end
      if finished then
        return
      end
      finished = true
      local err = nil
      if code ~= 0 then
        err = table.concat(stderr, '\n')
        if err == '' then
          err = 'curl exited with ' .. tostring(code)
        end
      end
      if opts.on_done then
        opts.on_done(status, table.concat(body_lines, '\n'), err, code)
      end
    end,
  })
  if job <= 0 then
    os.remove(hfile)
    return nil, 'cannot start ' .. cfg.curl
  end
  if opts.body then
    vim.fn.chansend(job, opts.body)
  end
  vim.fn.chanclose(job, 'stdin')
  return job
end

-- Stop a request's job (curl drops the connection).
function M.cancel(job)
  if job and job > 0 then
    pcall(vim.fn.jobstop, job)
  end
end

-- A JSON request with the API key (`auth = 'api'`, default) or the admin token
-- (`auth = 'admin'`). `on_done(decoded_or_nil, err_message_or_nil, status)` is called on the
-- main loop.
function M.json(method, path, body, auth, on_done)
  local cfg = require('securellm.config')
  local cred, from
  if auth == 'admin' then
    cred, from = cfg.admin_token()
  else
    cred, from = cfg.api_key()
  end
  if not cred then
    vim.schedule(function()
      on_done(nil, 'no ' .. (auth == 'admin' and 'admin token' or 'API key') .. ': ' .. from, 0)
    end)
    return nil
  end
  local headers = { Authorization = 'Bearer ' .. cred, Accept = 'application/json' }
  if body then
    headers['Content-Type'] = 'application/json'
  end
  return M.request({
    method = method,
    url = cfg.options.url .. path,
    headers = headers,
    body = body and vim.json.encode(body) or nil,
    timeout_s = 60,
    on_done = vim.schedule_wrap(function(status, text, err)
      if err then
        return on_done(nil, err, status)
      end
      if status < 200 or status >= 300 then
        return on_done(nil, M.error_message(status, text), status)
      end
      local ok, decoded = pcall(vim.json.decode, text)
      if not ok then
        return on_done(nil, 'not JSON: ' .. text:sub(1, 200), status)
      end
      on_done(decoded, nil, status)
    end),
  })
end

return M
