-- MLflow uses the POSTGRES_DB database (mlflow); Prefect gets its own.
CREATE DATABASE prefect;
