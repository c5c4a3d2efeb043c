-- `:checkhealth securellm`: curl, the gateway, the API key and the admin token (never shown).
-- Works with Neovim 0.7's `health` module and with `vim.health` (0.8 and later).

local M = {}

local function reporter()
  local h = vim.health or require('health')
  return {
    start = h.start or h.report_start,
    ok = h.ok or h.report_ok,
    warn = h.warn or h.report_warn,
    error = h.error or h.report_error,
    info = h.info or h.report_info,
  }
end

-- A blocking GET (health checks run synchronously): the status and the body.
local function get(url, cred)
  local cfg = require('securellm.config').options
  local cmd = { cfg.curl, '--silent', '--show-error', '--max-time', '5', '--write-out', '\n%{http_code}' }
  local hfile
  if cred then
    hfile = vim.fn.tempname()
    local f = io.open(hfile, 'w')
    f:close()
    vim.fn.setfperm(hfile, 'rw-------')
    f = io.open(hfile, 'w')
    f:write('Authorization: Bearer ' .. cred .. '\n')
    f:close()
    vim.list_extend(cmd, { '--header', '@' .. hfile })
  end
  table.insert(cmd, url)
  local out = vim.fn.system(cmd)
  if hfile then
    os.remove(hfile)
  end
  local body, status = out:match('^(.*)\n(%d+)%s*$')
  return tonumber(status) or 0, body or out
end

function M.check()
  local r = reporter()
  local config = require('securellm.config')
  local http = require('securellm.http')
  local cfg = config.options
  r.start('securellm')
  if vim.fn.has('nvim-0.7') == 1 then
    r.ok('Neovim ' .. tostring(vim.version().major) .. '.' .. tostring(vim.version().minor))
  else
    r.error('Neovim 0.7 or later is needed')
  end
  if vim.fn.executable(cfg.curl) == 1 then
    r.ok('curl: ' .. vim.fn.exepath(cfg.curl))
  else
    r.error('curl not found (' .. cfg.curl .. '): every request goes through it')
    return
  end
  local status, body = get(cfg.url .. '/health')
  if status == 200 then
    r.ok('gateway at ' .. cfg.url .. ' answers /health')
  else
    r.error('gateway at ' .. cfg.url .. ' does not answer /health (' .. http.error_message(status, body) .. ')')
    return
  end
  -- A credential: found (where, never what), and accepted by `path`. `fail` reports a missing or
  -- refused one; `accepted(body, from)` reports the success.
  local function credential(what, cred, from, path, fail, accepted)
    if not cred then
      return fail('no ' .. what .. ': ' .. from)
    end
    local st, b = get(cfg.url .. path, cred)
    if st ~= 200 then
      return fail(what .. ' from ' .. from .. ' is refused: ' .. http.error_message(st, b))
    end
    accepted(b, from)
  end
  local key, from = config.api_key()
  credential('API key', key, from, '/v1/models', r.error, function(b)
    local ok, decoded = pcall(vim.json.decode, b)
    local n = ok and type(decoded) == 'table' and type(decoded.data) == 'table' and #decoded.data or 0
    r.ok('API key from ' .. from .. ' works: ' .. n .. ' model(s)')
    if not cfg.model then
      r.warn('no model chosen: set `model` in setup() or pick one with :SecureLLMModels')
    else
      r.ok('model: ' .. cfg.model)
    end
  end)
  local token, tfrom = config.admin_token()
  credential('admin token', token, tfrom, '/admin/v1/status', function(m)
    r.warn(m .. ' (:SecureLLMStatus needs it)')
  end, function()
    r.ok('admin token from ' .. tfrom .. ' works (:SecureLLMStatus)')
  end)
end

return M
