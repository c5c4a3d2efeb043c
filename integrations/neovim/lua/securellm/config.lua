-- The plugin's settings: defaults, `setup()` overrides, and where the credentials come from.
--
-- Secrets never live in the configuration by default: the API key is `$SECURELLM_API_KEY`, else
-- the key file `make run` writes (`<data dir>/api-key`); the admin token (for
-- `:SecureLLMStatus`) is `$SECURELLM_ADMIN_TOKEN`, else `<data dir>/gateway/admin-token`. The
-- data directory is `$SECURELLM_DATA_DIR`, else `$XDG_DATA_HOME/securellm`, else
-- `~/.local/share/securellm` (the stack's default).

local M = {}

local function data_dir()
  local d = os.getenv('SECURELLM_DATA_DIR')
  if d and d ~= '' then
    return d
  end
  local xdg = os.getenv('XDG_DATA_HOME')
  if xdg and xdg ~= '' then
    return xdg .. '/securellm'
  end
  return (os.getenv('HOME') or '') .. '/.local/share/securellm'
end

M.defaults = {
  -- The gateway's HTTP address (the OpenAI API and `/admin/v1`).
  url = 'http://127.0.0.1:8088',
  -- The model; nil = the first one `/v1/models` lists (`:SecureLLMModels` picks one).
  model = nil,
  api_key_file = data_dir() .. '/api-key',
  admin_token_file = data_dir() .. '/gateway/admin-token',
  -- Chat and rewrite answers.
  max_tokens = 512,
  temperature = nil,
  system_prompt = nil,
  -- Inline completion (`/v1/completions`).
  completion = {
    max_tokens = 48,
    -- Send the text after the cursor as `suffix` (fill-in-the-middle), for models that support it.
    fim = false,
    -- At most this many lines before (and after, with `fim`) the cursor are sent.
    context_lines = 60,
  },
  keymaps = {
    -- In the chat buffer (normal mode).
    send = '<CR>',
    cancel = '<C-c>',
  },
  -- The curl binary, and the whole-request limit in seconds.
  curl = 'curl',
  timeout_s = 600,
}

M.options = vim.deepcopy(M.defaults)

function M.setup(opts)
  M.options = vim.tbl_deep_extend('force', vim.deepcopy(M.defaults), opts or {})
  if os.getenv('SECURELLM_URL') and os.getenv('SECURELLM_URL') ~= '' and not (opts or {}).url then
    M.options.url = os.getenv('SECURELLM_URL')
  end
  if os.getenv('SECURELLM_MODEL') and os.getenv('SECURELLM_MODEL') ~= '' and not (opts or {}).model then
    M.options.model = os.getenv('SECURELLM_MODEL')
  end
  return M.options
end

local function read_first_line(path)
  local f = path and io.open(vim.fn.expand(path), 'r')
  if not f then
    return nil
  end
  local line = f:read('*l')
  f:close()
  if line then
    line = vim.trim(line)
  end
  if line == '' then
    return nil
  end
  return line
end

-- A secret from the environment, else from its file. Returns the secret (or nil) and where it
-- came from (for `:checkhealth`, never the secret itself).
local function secret(env, file)
  local v = os.getenv(env)
  if v and vim.trim(v) ~= '' then
    return vim.trim(v), '$' .. env
  end
  local s = read_first_line(file)
  if s then
    return s, file
  end
  return nil, 'neither $' .. env .. ' nor ' .. tostring(file)
end

function M.api_key()
  return secret('SECURELLM_API_KEY', M.options.api_key_file)
end

function M.admin_token()
  return secret('SECURELLM_ADMIN_TOKEN', M.options.admin_token_file)
end

return M
