-- More free space in each page of sagas_instances, so that a transition's new row version
-- stays on its page (a HOT update: no new index entries).
--
-- Instances started together share a page and advance together. With fillfactor 80 a page of
-- ≈ 1 kB rows kept room for about one new version, so most of the page's next transitions
-- were not HOT: 2,270 of 6,000 updates in a 2,000-saga bench run were, although only the
-- 2,000 terminal ones (which change `status`, an indexed column) have to move. With 50, 7,951
-- of 12,000 in a 4,000-saga run (all but the terminal ones). The price is a table up to
-- twice as large; PostgreSQL applies the setting to pages written from now on.
ALTER TABLE sagas_instances SET (fillfactor = 50);
