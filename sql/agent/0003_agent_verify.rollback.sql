DROP TABLE dbsync.verify_mismatches;
DROP TABLE dbsync.verify_progress;
