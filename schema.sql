-- testio-mcp local cache schema. Idempotent: applying it twice is a no-op.
-- The version lives in PRAGMA user_version (set by testio_mcp.py after applying this file).
-- Times are UTC ISO-8601 text ('YYYY-MM-DDTHH:MM:SSZ'), so text comparison is time order.

CREATE TABLE IF NOT EXISTS products (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    type         TEXT,
    description  TEXT,
    has_sections INTEGER NOT NULL DEFAULT 0,
    section_ids  TEXT NOT NULL DEFAULT '[]',      -- JSON list of section ids to read features from
    raw          TEXT NOT NULL,                   -- API JSON
    synced_at    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS features (
    id           INTEGER PRIMARY KEY,             -- the global feature id
    product_id   INTEGER NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    title        TEXT NOT NULL,
    description  TEXT,
    howtofind    TEXT,
    user_stories TEXT NOT NULL DEFAULT '[]',      -- JSON list of user story titles
    section_ids  TEXT NOT NULL DEFAULT '[]',      -- JSON list: sections the feature was listed in
    synced_at    TEXT NOT NULL
);
-- list_features(product_id)
CREATE INDEX IF NOT EXISTS features_product ON features(product_id, title);

CREATE TABLE IF NOT EXISTS tests (
    id             INTEGER PRIMARY KEY,
    product_id     INTEGER NOT NULL REFERENCES products(id) ON DELETE CASCADE,
    section_id     INTEGER,
    title          TEXT NOT NULL,
    status         TEXT NOT NULL,                 -- one of the 7 API statuses (unknown ones kept as-is)
    review_status  TEXT,
    testing_type   TEXT NOT NULL,                 -- coverage|focused|rapid|usability|custom|test_case
    start_at       TEXT,                          -- UTC
    end_at         TEXT,                          -- UTC; the API orders by it, newest first
    raw            TEXT NOT NULL,                 -- API JSON minus test_environment credentials
    changed_at     TEXT NOT NULL,                 -- when the stored test last changed (a sync that sees
                                                  -- the same data leaves the row alone)
    bugs_synced_at TEXT                           -- NULL: the bugs must be (re)fetched
);
-- list_tests(product_id, dates) ordered by end_at; incremental sync boundaries
CREATE INDEX IF NOT EXISTS tests_product_end ON tests(product_id, end_at);
-- list_tests/get_quality_report filters by status
CREATE INDEX IF NOT EXISTS tests_product_status ON tests(product_id, status);
-- --refresh: the tests that can still change
CREATE INDEX IF NOT EXISTS tests_not_final ON tests(product_id)
    WHERE status NOT IN ('archived', 'cancelled');
-- the sync's bug work list (new tests, tests whose status changed, interrupted syncs)
CREATE INDEX IF NOT EXISTS tests_bugs_due ON tests(product_id) WHERE bugs_synced_at IS NULL;

CREATE TABLE IF NOT EXISTS test_features (
    test_id         INTEGER NOT NULL REFERENCES tests(id) ON DELETE CASCADE,
    test_feature_id INTEGER NOT NULL,             -- the per-test snapshot id bugs point to
    feature_id      INTEGER NOT NULL,             -- the global feature id
    title           TEXT,
    PRIMARY KEY (test_id, test_feature_id)
);
-- list_features: tests per feature
CREATE INDEX IF NOT EXISTS test_features_feature ON test_features(feature_id);

CREATE TABLE IF NOT EXISTS bugs (
    id               INTEGER PRIMARY KEY,
    test_id          INTEGER NOT NULL REFERENCES tests(id) ON DELETE CASCADE,
    product_id       INTEGER NOT NULL,
    feature_id       INTEGER,
    title            TEXT NOT NULL,
    status           TEXT NOT NULL,               -- open|accepted|auto_accepted|rejected (derived)
    severity         TEXT,                        -- low|high|critical|visual|content|custom
    bug_type         TEXT NOT NULL,               -- functional|visual|content|custom (derived)
    known            INTEGER NOT NULL DEFAULT 0,
    rejection_reason TEXT,                        -- derived from the standard rejection comments
    reported_at      TEXT,                        -- UTC
    tester           TEXT,
    platform         TEXT,                        -- operating system of the first device
    exported_at      TEXT,
    raw              TEXT NOT NULL,
    changed_at       TEXT NOT NULL                -- when the stored bug last changed (as tests.changed_at)
);
-- bug counts per test (list_tests, get_test_status, get_quality_report) and every query_metrics
-- pivot, which reaches bugs by test (and feature): covering, no row reads (a row holds its raw JSON)
CREATE INDEX IF NOT EXISTS bugs_test_facets
    ON bugs(test_id, feature_id, status, severity, bug_type, known, rejection_reason, tester, platform);
-- list_bugs(product_ids, dates) and reports by product
CREATE INDEX IF NOT EXISTS bugs_product_reported ON bugs(product_id, reported_at);
-- list_bugs(status / severity filters); get_quality_report's breakdowns, grouped in this order (covering:
-- a test id to keep the bugs of the tests in scope)
CREATE INDEX IF NOT EXISTS bugs_product_status
    ON bugs(product_id, status, severity, bug_type, known, rejection_reason, test_id);
-- list_features: bugs and rejected bugs per feature (covering)
CREATE INDEX IF NOT EXISTS bugs_feature_status ON bugs(feature_id, status);

-- Row counts per product, kept exact by the triggers below, so stats and list_products stay flat
-- as the database grows (count(*) reads every row).
CREATE TABLE IF NOT EXISTS counts (
    product_id INTEGER PRIMARY KEY,
    tests      INTEGER NOT NULL DEFAULT 0,
    bugs       INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS tests_count_ins AFTER INSERT ON tests BEGIN
    INSERT INTO counts (product_id, tests) VALUES (NEW.product_id, 1)
    ON CONFLICT(product_id) DO UPDATE SET tests = tests + 1;
END;
CREATE TRIGGER IF NOT EXISTS tests_count_del AFTER DELETE ON tests BEGIN
    UPDATE counts SET tests = tests - 1 WHERE product_id = OLD.product_id;
END;
CREATE TRIGGER IF NOT EXISTS tests_count_move AFTER UPDATE OF product_id ON tests
WHEN OLD.product_id IS NOT NEW.product_id BEGIN
    UPDATE counts SET tests = tests - 1 WHERE product_id = OLD.product_id;
    INSERT INTO counts (product_id, tests) VALUES (NEW.product_id, 1)
    ON CONFLICT(product_id) DO UPDATE SET tests = tests + 1;
END;
CREATE TRIGGER IF NOT EXISTS bugs_count_ins AFTER INSERT ON bugs BEGIN
    INSERT INTO counts (product_id, bugs) VALUES (NEW.product_id, 1)
    ON CONFLICT(product_id) DO UPDATE SET bugs = bugs + 1;
END;
CREATE TRIGGER IF NOT EXISTS bugs_count_del AFTER DELETE ON bugs BEGIN
    UPDATE counts SET bugs = bugs - 1 WHERE product_id = OLD.product_id;
END;
CREATE TRIGGER IF NOT EXISTS bugs_count_move AFTER UPDATE OF product_id ON bugs
WHEN OLD.product_id IS NOT NEW.product_id BEGIN
    UPDATE counts SET bugs = bugs - 1 WHERE product_id = OLD.product_id;
    INSERT INTO counts (product_id, bugs) VALUES (NEW.product_id, 1)
    ON CONFLICT(product_id) DO UPDATE SET bugs = bugs + 1;
END;

CREATE TABLE IF NOT EXISTS sync_runs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    mode              TEXT NOT NULL,              -- incremental|refresh|force|nuke|retry
    trigger           TEXT NOT NULL,              -- cli|server_start|background|tool
    started_at        TEXT NOT NULL,
    ended_at          TEXT,
    status            TEXT NOT NULL,              -- running|success|completed_with_problems|failed|interrupted
    products          INTEGER NOT NULL DEFAULT 0,
    new_tests         INTEGER NOT NULL DEFAULT 0,
    updated_tests     INTEGER NOT NULL DEFAULT 0,
    bugs              INTEGER NOT NULL DEFAULT 0,
    features          INTEGER NOT NULL DEFAULT 0,
    api_requests      INTEGER NOT NULL DEFAULT 0,
    recovery_attempts INTEGER NOT NULL DEFAULT 0,
    problems          INTEGER NOT NULL DEFAULT 0,
    pid               INTEGER,
    error             TEXT
);
-- the change log's triggers: the run in progress (a partial index of at most a few rows)
CREATE INDEX IF NOT EXISTS sync_runs_running ON sync_runs(id) WHERE status = 'running';

CREATE TABLE IF NOT EXISTS product_sync (
    product_id       INTEGER PRIMARY KEY,
    last_synced_at   TEXT,                        -- last walk that reached its end
    last_status      TEXT,
    walk_mode        TEXT,                        -- set while a walk is unfinished (the checkpoint)
    walk_next_page   INTEGER,                     -- first page not yet stored by that walk
    walk_per_page    INTEGER,
    walk_started_at  TEXT
);

CREATE TABLE IF NOT EXISTS problematic_events (
    event_id       TEXT PRIMARY KEY,
    product_id     INTEGER NOT NULL,
    page           INTEGER NOT NULL,              -- page number at per_page of the walk
    per_page       INTEGER NOT NULL,
    offset_start   INTEGER NOT NULL,              -- 0-based position in the newest-first list
    offset_end     INTEGER NOT NULL,
    before_id      INTEGER,
    before_end_at  TEXT,
    after_id       INTEGER,
    after_end_at   TEXT,
    attempts       INTEGER NOT NULL,
    first_seen_at  TEXT NOT NULL,
    last_seen_at   TEXT NOT NULL,
    run_id         INTEGER                        -- the run whose full recovery last found it; NULL once
                                                  -- `problematic retry` asks the next sync to re-read it
);
-- the same broken position seen again by a later sync is one event, not a new one
CREATE UNIQUE INDEX IF NOT EXISTS problematic_position
    ON problematic_events(product_id, ifnull(before_id, 0), ifnull(after_id, 0));

CREATE TABLE IF NOT EXISTS problematic_tests (
    event_id  TEXT NOT NULL REFERENCES problematic_events(event_id) ON DELETE CASCADE,
    test_id   INTEGER NOT NULL,
    mapped_at TEXT NOT NULL,
    PRIMARY KEY (event_id, test_id)
);

-- Full-text search over products, features, tests and bugs (search tool).
-- rowid = entity code << 40 | id (1 product, 2 feature, 3 test, 4 bug) so a row is replaced by rowid.
-- Products and features (few rows) are indexed by triggers; tests and bugs are indexed in bulk by
-- the statements that store them (per-row FTS5 writes from triggers cost a sync most of its time).
-- product_id is indexed (its id as a word), so search(product_ids) matches `product_id : ("7")` in the
-- index and reads that product's matches only; the user's words are matched in title and body.
CREATE VIRTUAL TABLE IF NOT EXISTS search_fts USING fts5(
    title, body, entity UNINDEXED, product_id,
    tokenize = 'unicode61 remove_diacritics 2'
);

CREATE TRIGGER IF NOT EXISTS products_fts_ins AFTER INSERT ON products BEGIN
    INSERT INTO search_fts(rowid, title, body, entity, product_id)
    VALUES ((1 << 40) | NEW.id, NEW.name, coalesce(NEW.description, ''), 'product', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS products_fts_upd AFTER UPDATE ON products BEGIN
    DELETE FROM search_fts WHERE rowid = (1 << 40) | OLD.id;
    INSERT INTO search_fts(rowid, title, body, entity, product_id)
    VALUES ((1 << 40) | NEW.id, NEW.name, coalesce(NEW.description, ''), 'product', NEW.id);
END;
CREATE TRIGGER IF NOT EXISTS products_fts_del AFTER DELETE ON products BEGIN
    DELETE FROM search_fts WHERE rowid = (1 << 40) | OLD.id;
END;

CREATE TRIGGER IF NOT EXISTS features_fts_ins AFTER INSERT ON features BEGIN
    INSERT INTO search_fts(rowid, title, body, entity, product_id)
    VALUES ((2 << 40) | NEW.id, NEW.title,
            coalesce(NEW.description, '') || ' ' || coalesce(NEW.howtofind, '') || ' ' ||
            coalesce((SELECT group_concat(value, ' ') FROM json_each(NEW.user_stories)), ''),
            'feature', NEW.product_id);
END;
CREATE TRIGGER IF NOT EXISTS features_fts_upd AFTER UPDATE ON features BEGIN
    DELETE FROM search_fts WHERE rowid = (2 << 40) | OLD.id;
    INSERT INTO search_fts(rowid, title, body, entity, product_id)
    VALUES ((2 << 40) | NEW.id, NEW.title,
            coalesce(NEW.description, '') || ' ' || coalesce(NEW.howtofind, '') || ' ' ||
            coalesce((SELECT group_concat(value, ' ') FROM json_each(NEW.user_stories)), ''),
            'feature', NEW.product_id);
END;
CREATE TRIGGER IF NOT EXISTS features_fts_del AFTER DELETE ON features BEGIN
    DELETE FROM search_fts WHERE rowid = (2 << 40) | OLD.id;
END;

CREATE TRIGGER IF NOT EXISTS tests_fts_del AFTER DELETE ON tests BEGIN
    DELETE FROM search_fts WHERE rowid = (3 << 40) | OLD.id;
END;

CREATE TRIGGER IF NOT EXISTS bugs_fts_del AFTER DELETE ON bugs BEGIN
    DELETE FROM search_fts WHERE rowid = (4 << 40) | OLD.id;
END;

-- The change log: one row per change the sync saw in the tests and bugs it stored ("what changed
-- since Monday?": the API has no "changed since"; a copy that remembers can answer). The triggers below
-- write it inside the statement that stores the data, so a change and its data are committed together
-- or not at all (a killed sync never splits them). A product logs from its baseline on: the end of its
-- first complete walk (product_sync.last_synced_at set), marked by a 'baseline' row; what that walk
-- stored is the baseline, not thousands of "new" rows. wipe() (--nuke) deletes product_sync first, so
-- the refill is a new baseline and the older rows stay as history. The sync prunes rows older than
-- TESTIO_CHANGE_RETENTION_DAYS.
CREATE TABLE IF NOT EXISTS changes (
    id         INTEGER PRIMARY KEY,
    seen_at    TEXT NOT NULL,                 -- UTC, when stored: the change happened before
    run_id     INTEGER,                       -- the sync run in progress when stored (NULL: none)
    product_id INTEGER NOT NULL,
    kind       TEXT NOT NULL,                 -- baseline, or one of CHANGE_KINDS (testio_mcp.py)
    test_id    INTEGER,
    bug_id     INTEGER,
    title      TEXT,                          -- the test's (bug's) title when seen
    old_value  TEXT,                          -- status, severity, or 'start_at/end_at' (test_dates)
    new_value  TEXT,
    reason     TEXT                           -- the rejection reason of a bug now rejected
);
-- get_changes(since) newest first; the sync's pruning by age
CREATE INDEX IF NOT EXISTS changes_seen ON changes(seen_at);
-- get_changes: where the log of each product starts
CREATE INDEX IF NOT EXISTS changes_baseline ON changes(product_id, seen_at) WHERE kind = 'baseline';

-- what every change row is stamped with: now, and the sync run in progress
CREATE VIEW IF NOT EXISTS change_stamp AS
SELECT strftime('%Y-%m-%dT%H:%M:%SZ', 'now') AS seen_at,
       (SELECT max(id) FROM sync_runs WHERE status = 'running') AS run_id;
-- the products past their baseline: only their changes are logged
CREATE VIEW IF NOT EXISTS change_logged AS
SELECT product_id FROM product_sync WHERE last_synced_at IS NOT NULL;

CREATE TRIGGER IF NOT EXISTS product_sync_baseline AFTER UPDATE OF last_synced_at ON product_sync
WHEN OLD.last_synced_at IS NULL AND NEW.last_synced_at IS NOT NULL BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind)
    SELECT seen_at, run_id, NEW.product_id, 'baseline' FROM change_stamp;
END;
CREATE TRIGGER IF NOT EXISTS product_sync_baseline_new AFTER INSERT ON product_sync
WHEN NEW.last_synced_at IS NOT NULL BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind)
    SELECT seen_at, run_id, NEW.product_id, 'baseline' FROM change_stamp;
END;

CREATE TRIGGER IF NOT EXISTS tests_log_new AFTER INSERT ON tests
WHEN EXISTS (SELECT 1 FROM change_logged WHERE product_id = NEW.product_id) BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind, test_id, title, new_value)
    SELECT seen_at, run_id, NEW.product_id, 'test_new', NEW.id, NEW.title, NEW.status
    FROM change_stamp;
END;
CREATE TRIGGER IF NOT EXISTS tests_log_status AFTER UPDATE OF status ON tests
WHEN OLD.status IS NOT NEW.status
     AND EXISTS (SELECT 1 FROM change_logged WHERE product_id = NEW.product_id) BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind, test_id, title, old_value, new_value)
    SELECT seen_at, run_id, NEW.product_id, 'test_status', NEW.id, NEW.title, OLD.status, NEW.status
    FROM change_stamp;
END;
CREATE TRIGGER IF NOT EXISTS tests_log_dates AFTER UPDATE OF start_at, end_at ON tests
WHEN (OLD.start_at IS NOT NEW.start_at OR OLD.end_at IS NOT NEW.end_at)
     AND EXISTS (SELECT 1 FROM change_logged WHERE product_id = NEW.product_id) BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind, test_id, title, old_value, new_value)
    SELECT seen_at, run_id, NEW.product_id, 'test_dates', NEW.id, NEW.title,
           coalesce(OLD.start_at, '') || '/' || coalesce(OLD.end_at, ''),
           coalesce(NEW.start_at, '') || '/' || coalesce(NEW.end_at, '') FROM change_stamp;
END;
CREATE TRIGGER IF NOT EXISTS tests_log_deleted AFTER DELETE ON tests
WHEN EXISTS (SELECT 1 FROM change_logged WHERE product_id = OLD.product_id) BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind, test_id, title, old_value)
    SELECT seen_at, run_id, OLD.product_id, 'test_deleted', OLD.id, OLD.title, OLD.status
    FROM change_stamp;
END;

CREATE TRIGGER IF NOT EXISTS bugs_log_new AFTER INSERT ON bugs
WHEN EXISTS (SELECT 1 FROM change_logged WHERE product_id = NEW.product_id) BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind, test_id, bug_id, title, new_value, reason)
    SELECT seen_at, run_id, NEW.product_id, 'bug_new', NEW.test_id, NEW.id, NEW.title, NEW.status,
           NEW.rejection_reason FROM change_stamp;
END;
CREATE TRIGGER IF NOT EXISTS bugs_log_status AFTER UPDATE OF status ON bugs
WHEN OLD.status IS NOT NEW.status
     AND EXISTS (SELECT 1 FROM change_logged WHERE product_id = NEW.product_id) BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind, test_id, bug_id, title, old_value,
                         new_value, reason)
    SELECT seen_at, run_id, NEW.product_id, 'bug_status', NEW.test_id, NEW.id, NEW.title, OLD.status,
           NEW.status, NEW.rejection_reason FROM change_stamp;
END;
CREATE TRIGGER IF NOT EXISTS bugs_log_severity AFTER UPDATE OF severity ON bugs
WHEN OLD.severity IS NOT NEW.severity
     AND EXISTS (SELECT 1 FROM change_logged WHERE product_id = NEW.product_id) BEGIN
    INSERT INTO changes (seen_at, run_id, product_id, kind, test_id, bug_id, title, old_value,
                         new_value)
    SELECT seen_at, run_id, NEW.product_id, 'bug_severity', NEW.test_id, NEW.id, NEW.title,
           OLD.severity, NEW.severity FROM change_stamp;
END;
